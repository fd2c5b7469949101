//! A request body, parsed and converted as the chat, completions, Responses and Messages
//! routes do (custom tools' grammars rewritten, input items read): any bytes give a
//! conversation or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moeserve::api::anthropic::MessagesRequest;
use moeserve::api::openai_responses::{read_input, ResponsesRequest};
use moeserve::api::requests::{ChatCompletionRequest, CompletionRequest};
use moeserve::api::structured::constraint_spec;

fn parse<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    let de = &mut serde_json::Deserializer::from_slice(data);
    serde_path_to_error::deserialize(de).ok()
}

fuzz_target!(|data: &[u8]| {
    if let Some(req) = parse::<ChatCompletionRequest>(data) {
        if let Ok(conv) = req.to_conversation(16) {
            let _ = conv.template_messages();
        }
    }
    if let Some(req) = parse::<ResponsesRequest>(data) {
        if let Some(input) = req.input.as_ref().and_then(|i| read_input(i).ok()) {
            let _ = req.function_namespaces(&input);
            let _ = req.to_conversation(vec![], input);
        }
    }
    if let Some(req) = parse::<MessagesRequest>(data) {
        let _ = req.to_conversation(true);
    }
    if let Some(req) = parse::<CompletionRequest>(data) {
        let _ = req.to_params(16);
        let _ = req.prompts();
        let _ = constraint_spec(None, req.structured_outputs.as_ref());
    }
});
