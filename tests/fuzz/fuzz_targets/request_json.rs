//! A request body, parsed and validated as the chat and completions routes do: any
//! bytes give a request or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeserve::api::requests::{ChatCompletionRequest, CompletionRequest};
use moeserve::api::structured::constraint_spec;
use moeserve::api::tools::tool_plan;

fn parse<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    let de = &mut serde_json::Deserializer::from_slice(data);
    serde_path_to_error::deserialize(de).ok()
}

fuzz_target!(|data: &[u8]| {
    if let Some(req) = parse::<ChatCompletionRequest>(data) {
        let _ = req.template_messages();
        let _ = req.to_params(16);
        let _ = constraint_spec(req.response_format.as_ref(), req.structured_outputs.as_ref());
        let _ = tool_plan(
            req.tools.as_deref(),
            req.tool_choice.as_ref(),
            req.parallel_tool_calls,
        );
    }
    if let Some(req) = parse::<CompletionRequest>(data) {
        let _ = req.to_params(16);
        let _ = req.prompts();
        let _ = constraint_spec(None, req.structured_outputs.as_ref());
    }
});
