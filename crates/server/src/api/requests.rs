//! OpenAI's request types (with vLLM's common extensions) and their translation into the
//! engine's sampling parameters.

use std::collections::HashMap;

use moeserve_core::engine::SamplingParams;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::api::conversation::{custom_arguments, Call, Conversation, Message, Role, CHAT_FIELDS};
use crate::api::structured::{constraint_spec, ResponseFormat, StructuredOutputs};
use crate::api::tools::{tool_plan, ToolDef};
use crate::error::ApiError;

/// OpenAI treats `null` as "not set": a field with a default takes it for `null` too
/// (LangChain, LiteLLM and older SDKs send `"stream": null`).
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One stop string or several (up to 4).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Declares a request type with the sampling fields inline (not `#[serde(flatten)]`,
/// which would hide the failing field's name from error messages) plus its own fields,
/// and their translation into the engine's parameters.
macro_rules! request_with_sampling {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize, ToSchema)]
        pub struct $name {
            pub temperature: Option<f32>,
            pub top_p: Option<f32>,
            pub n: Option<usize>,
            pub stop: Option<StopSpec>,
            pub presence_penalty: Option<f32>,
            pub frequency_penalty: Option<f32>,
            pub logit_bias: Option<HashMap<String, f32>>,
            pub seed: Option<i64>,
            // vLLM's extensions.
            pub top_k: Option<i32>,
            pub min_p: Option<f32>,
            pub repetition_penalty: Option<f32>,
            pub min_tokens: Option<usize>,
            pub ignore_eos: Option<bool>,
            pub stop_token_ids: Option<Vec<u32>>,
            pub skip_special_tokens: Option<bool>,
            /// moeserve's extension: `false` opts this request out of speculative
            /// decoding (its output is the same either way).
            pub speculative: Option<bool>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// The engine's parameters from the sampling fields; their ranges are checked by
            /// the engine at submit.
            pub fn sampling_params(&self, max_tokens: Option<usize>, max_n: usize) -> Result<SamplingParams, ApiError> {
                let n = self.n.unwrap_or(1);
                if n == 0 || n > max_n {
                    return Err(ApiError::invalid_param(
                        "n",
                        format!("n must be between 1 and {max_n}, got {n}"),
                    ));
                }
                let mut logit_bias = Vec::new();
                for (k, &v) in self.logit_bias.iter().flatten() {
                    let id: u32 = k.parse().map_err(|_| {
                        ApiError::invalid_param("logit_bias", format!("logit_bias key {k:?} is not a token id"))
                    })?;
                    logit_bias.push((id, v));
                }
                logit_bias.sort_by_key(|x| x.0);
                let d = SamplingParams::default();
                Ok(SamplingParams {
                    n,
                    max_tokens,
                    min_tokens: self.min_tokens.unwrap_or(0),
                    temperature: self.temperature.unwrap_or(d.temperature),
                    top_p: self.top_p.unwrap_or(d.top_p),
                    top_k: self.top_k.unwrap_or(d.top_k),
                    min_p: self.min_p.unwrap_or(d.min_p),
                    presence_penalty: self.presence_penalty.unwrap_or(0.0),
                    frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                    repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                    logit_bias,
                    seed: self.seed.map(|s| s as u64),
                    logprobs: None,
                    prompt_logprobs: None,
                    stop: match &self.stop {
                        None => vec![],
                        Some(StopSpec::One(s)) => vec![s.clone()],
                        Some(StopSpec::Many(v)) => v.clone(),
                    },
                    stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
                    ignore_eos: self.ignore_eos.unwrap_or(false),
                    skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
                    reasoning: None,
                    constraint: None,
                    speculative: self.speculative.unwrap_or(true),
                })
            }
        }
    };
}

/// A message's content: a string, or a list of text parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Value>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

request_with_sampling! {
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub tools: Option<Vec<ToolDef>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ..}}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Extension: close a reasoning model's thought after this many tokens.
    pub max_reasoning_tokens: Option<usize>,
    pub response_format: Option<ResponseFormat>,
    /// Extension (vLLM's): a JSON schema, regex, choice or grammar for the output.
    pub structured_outputs: Option<StructuredOutputs>,
}
}
// `user` and other unknown fields are accepted and ignored.

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// An assistant message's `tool_calls` (function calls, and custom tools' calls, whose
/// input becomes the arguments `{"input": ..}` the model writes).
fn chat_calls(calls: &Value, at: &str) -> Result<Vec<Call>, ApiError> {
    let Some(list) = calls.as_array() else {
        return Err(ApiError::invalid_param(at, "tool_calls must be a list"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, c) in list.iter().enumerate() {
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let (name, arguments) = if let Some(custom) = c.get("custom") {
            (
                custom.get("name").and_then(Value::as_str),
                custom_arguments(custom.get("input").and_then(Value::as_str).unwrap_or("")),
            )
        } else {
            let f = c.get("function");
            let arguments = match f.and_then(|f| f.get("arguments")) {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => "{}".to_string(),
                Some(other) => other.to_string(),
            };
            (f.and_then(|f| f.get("name")).and_then(Value::as_str), arguments)
        };
        let Some(name) = name else {
            return Err(ApiError::invalid_param(
                &format!("{at}[{j}].function.name"),
                "a tool call needs the name of the function it calls",
            ));
        };
        out.push(Call {
            id,
            name: name.to_string(),
            arguments,
        });
    }
    Ok(out)
}

impl ChatCompletionRequest {
    /// The conversation's messages, typed: content as one string (text parts joined).
    fn messages(&self) -> Result<Vec<Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param("messages", "messages must not be empty"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            // Templates know system, user, assistant and tool.
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].role"),
                        format!("unknown role {other:?} (expected one of {})", ROLES.join(", ")),
                    ))
                }
            };
            let content = match &m.content {
                None if role == Role::Assistant => String::new(),
                None => {
                    return Err(ApiError::invalid_param(
                        &format!("messages[{i}].content"),
                        format!("a {} message needs content", m.role),
                    ))
                }
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].content[{j}].text"),
                                    "a text part needs `text`",
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].content[{j}].type"),
                                    format!("content parts of type {other:?} are not supported (only text)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            if role == Role::Tool && m.tool_call_id.is_none() {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message needs the tool_call_id it answers",
                ));
            }
            let calls = match m.tool_calls.as_ref().filter(|c| !c.is_null()) {
                Some(c) => chat_calls(c, &format!("messages[{i}].tool_calls"))?,
                None => Vec::new(),
            };
            out.push(Message {
                role,
                content,
                name: m.name.clone(),
                calls,
                call_id: m.tool_call_id.clone(),
            });
        }
        Ok(out)
    }

    /// The request as the conversation every API is converted into.
    pub fn to_conversation(&self, max_n: usize) -> Result<Conversation, ApiError> {
        Ok(Conversation {
            model: self.model.clone(),
            messages: self.messages()?,
            tools: tool_plan(
                self.tools.as_deref(),
                self.tool_choice.as_ref(),
                self.parallel_tool_calls,
            )?,
            params: self.to_params(max_n)?,
            temperature_set: self.temperature.is_some(),
            format: constraint_spec(self.response_format.as_ref(), self.structured_outputs.as_ref())?,
            max_reasoning_tokens: self.max_reasoning_tokens,
            reasoning_field: "max_reasoning_tokens",
            clamp_max_tokens: false,
            fields: &CHAT_FIELDS,
        })
    }

    pub fn to_params(&self, max_n: usize) -> Result<SamplingParams, ApiError> {
        let mut p = self.sampling_params(self.max_completion_tokens.or(self.max_tokens), max_n)?;
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ));
        }
        if self.logprobs {
            p.logprobs = Some(self.top_logprobs.unwrap_or(0));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid_param(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        Ok(p)
    }
}

/// A prompt as a string, strings, token ids or lists of token ids.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

request_with_sampling! {
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptSpec,
    pub max_tokens: Option<usize>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Top log-probabilities per token (0-20).
    pub logprobs: Option<usize>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<usize>,
    /// Extension (vLLM's): a JSON schema, regex, choice or grammar for the output.
    pub structured_outputs: Option<StructuredOutputs>,
}
}

impl CompletionRequest {
    /// OpenAI's default for completions is 16 tokens.
    pub const DEFAULT_MAX_TOKENS: usize = 16;

    pub fn to_params(&self, max_n: usize) -> Result<SamplingParams, ApiError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid_param(
                "suffix",
                "suffix (insertion) is not supported",
            ));
        }
        if let Some(k) = self
            .logprobs
            .filter(|&k| k > moeserve_core::sampling::MAX_TOP_LOGPROBS)
        {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!(
                    "logprobs must be at most {}, got {k}",
                    moeserve_core::sampling::MAX_TOP_LOGPROBS
                ),
            ));
        }
        if let Some(b) = self.best_of {
            if b != self.n.unwrap_or(1) {
                return Err(ApiError::invalid_param(
                    "best_of",
                    "best_of other than n is not supported",
                ));
            }
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid_param(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        let mut p = self.sampling_params(Some(self.max_tokens.unwrap_or(Self::DEFAULT_MAX_TOKENS)), max_n)?;
        p.logprobs = self.logprobs;
        if self.echo && self.logprobs.is_some() {
            p.prompt_logprobs = self.logprobs;
        }
        Ok(p)
    }

    /// The prompts, as text or token ids.
    pub fn prompts(&self) -> Result<Vec<Prompt>, ApiError> {
        let ps = match &self.prompt {
            PromptSpec::Text(t) => vec![Prompt::Text(t.clone())],
            PromptSpec::Texts(v) => v.iter().cloned().map(Prompt::Text).collect(),
            PromptSpec::Tokens(v) => vec![Prompt::Tokens(v.clone())],
            PromptSpec::TokenLists(v) => v.iter().cloned().map(Prompt::Tokens).collect(),
        };
        if ps.is_empty() {
            return Err(ApiError::invalid_param("prompt", "prompt must not be empty"));
        }
        Ok(ps)
    }
}

#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}
