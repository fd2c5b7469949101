//! The conversation every generation API (Chat Completions, Responses, Messages) is
//! converted into, with typed code, before the chat template renders it: the messages,
//! the tools and how they may be used, the answer's format, the sampling parameters and
//! limits. It remembers what each field is called in the client's API, so an error
//! found later (by the template, the grammar compiler or the engine) names the field the
//! client sent: `max_output_tokens` on Responses, `stop_sequences` on Messages.

use moeserve_core::engine::SamplingParams;
use moeserve_core::grammar::ConstraintSpec;
use serde_json::{json, Value};

use crate::api::tools::{ToolChoice, ToolPlan};
use crate::error::ApiError;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions (OpenAI's `developer` too).
    System,
    User,
    Assistant,
    /// A tool's result, answering a call.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call of an assistant message: `arguments` is the JSON text of the arguments
/// object (a custom tool's is `{"input": <text>}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Chat's optional participant name.
    pub name: Option<String>,
    /// An assistant message's calls.
    pub calls: Vec<Call>,
    /// The call a tool message answers.
    pub call_id: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            name: None,
            calls: Vec::new(),
            call_id: None,
        }
    }

    /// A tool's result for call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            call_id: Some(call_id.into()),
            ..Message::new(Role::Tool, content)
        }
    }

    /// The message as chat templates take it: `{role, content, name?, tool_calls?,
    /// tool_call_id?}`, calls in OpenAI's shape.
    pub fn template_value(&self) -> Value {
        let mut m = json!({"role": self.role.as_str(), "content": self.content});
        if let Some(n) = &self.name {
            m["name"] = n.clone().into();
        }
        if !self.calls.is_empty() {
            m["tool_calls"] = self
                .calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
        }
        if let Some(id) = &self.call_id {
            m["tool_call_id"] = id.clone().into();
        }
        m
    }

    /// Appends `call` to the assistant message at the end of `messages`, or starts one
    /// (an API that sends calls as items of their own, as Responses does, groups one
    /// turn's calls this way).
    pub fn push_call(messages: &mut Vec<Message>, call: Call) {
        match messages.last_mut() {
            Some(m) if m.role == Role::Assistant => m.calls.push(call),
            _ => {
                let mut m = Message::new(Role::Assistant, "");
                m.calls.push(call);
                messages.push(m);
            }
        }
    }
}

/// What a field is called in the client's API, where it is not what the engine calls it.
#[derive(Debug)]
pub struct Fields {
    /// The conversation (`messages`, `input`).
    pub messages: &'static str,
    pub max_tokens: &'static str,
    pub stop: &'static str,
}

pub const CHAT_FIELDS: Fields = Fields {
    messages: "messages",
    max_tokens: "max_tokens",
    stop: "stop",
};

pub const RESPONSES_FIELDS: Fields = Fields {
    messages: "input",
    max_tokens: "max_output_tokens",
    stop: "stop",
};

pub const MESSAGES_FIELDS: Fields = Fields {
    messages: "messages",
    max_tokens: "max_tokens",
    stop: "stop_sequences",
};

impl Fields {
    /// An error naming an engine parameter, renamed to the client's field.
    pub fn rename(&self, e: ApiError) -> ApiError {
        match e {
            ApiError::InvalidRequest {
                message,
                param: Some(p),
                code,
            } => {
                let param = match p.as_str() {
                    "max_tokens" => self.max_tokens.to_string(),
                    "stop" => self.stop.to_string(),
                    _ => p,
                };
                ApiError::InvalidRequest {
                    message,
                    param: Some(param),
                    code,
                }
            }
            other => other,
        }
    }
}

/// A request of any generation API, ready for the chat template and the engine.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub model: String,
    pub messages: Vec<Message>,
    /// The tools offered and how the answer may use them (`None`: no tools).
    pub tools: Option<ToolPlan>,
    /// The sampling parameters and limits; the constraint and the reasoning budget are
    /// added when the prompt is rendered.
    pub params: SamplingParams,
    /// Whether the client chose a temperature (else the server's default applies).
    pub temperature_set: bool,
    /// The answer's format, and the field it came from.
    pub format: Option<(ConstraintSpec, &'static str)>,
    /// A reasoning model's thinking budget.
    pub max_reasoning_tokens: Option<usize>,
    /// The field the thinking budget came from.
    pub reasoning_field: &'static str,
    /// Cut a `max_tokens` past what the context leaves to what it leaves (agents send
    /// their model's maximum whatever the context: Claude Code 32000), instead of
    /// refusing it as chat does.
    pub clamp_max_tokens: bool,
    pub fields: &'static Fields,
}

impl Conversation {
    /// The conversation as the chat template takes it.
    pub fn template_messages(&self) -> Vec<Value> {
        self.messages.iter().map(Message::template_value).collect()
    }

    /// `tool_choice` as chat templates take it.
    pub fn template_tool_choice(&self) -> Option<Value> {
        Some(match &self.tools.as_ref()?.choice {
            ToolChoice::None => json!("none"),
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Named(n) => json!({"type": "function", "function": {"name": n}}),
        })
    }

    /// The names of the functions offered (for the conversions' tests).
    #[cfg(test)]
    pub fn function_names(&self) -> Vec<String> {
        self.tools
            .iter()
            .flat_map(|t| &t.functions)
            .map(|f| f.name.clone())
            .collect()
    }

    /// The functions offered as custom (free-form) tools.
    pub fn custom_names(&self) -> std::collections::HashSet<String> {
        self.tools
            .iter()
            .flat_map(|t| &t.functions)
            .filter(|f| f.custom.is_some())
            .map(|f| f.name.clone())
            .collect()
    }
}

/// The text of a custom tool's call: the `input` of its arguments.
pub fn custom_input(arguments: &str) -> String {
    serde_json::from_str::<Value>(arguments)
        .ok()
        .and_then(|v| v.get("input").and_then(Value::as_str).map(String::from))
        .unwrap_or_default()
}

/// A custom tool call's input as the arguments the model writes and reads.
pub fn custom_arguments(input: &str) -> String {
    json!({ "input": input }).to_string()
}

/// Decodes a custom call's input while its arguments stream in: the text after
/// `{"input": "` with JSON's escapes undone, up to the closing quote; an escape split
/// across pieces waits for its end.
#[derive(Debug, Default)]
pub struct InputDecoder {
    /// Argument text not yet decoded.
    pending: String,
    started: bool,
    ended: bool,
}

impl InputDecoder {
    /// The input text of the next piece of arguments.
    pub fn push(&mut self, piece: &str) -> String {
        self.pending.push_str(piece);
        let mut out = String::new();
        if !self.started {
            let Some(q) = self
                .pending
                .find(':')
                .and_then(|c| self.pending[c..].find('"').map(|q| c + q))
            else {
                return out;
            };
            self.pending.drain(..=q);
            self.started = true;
        }
        while !self.ended && !self.pending.is_empty() {
            let take = match self.pending.as_bytes()[0] {
                b'"' => {
                    self.ended = true;
                    break;
                }
                b'\\' => {
                    let len = match self.pending.as_bytes().get(1) {
                        None => break,
                        Some(b'u') => 6,
                        Some(_) => 2,
                    };
                    if self.pending.len() < len {
                        break;
                    }
                    // A surrogate pair is two escapes: wait for the second.
                    let pair = len == 6
                        && self
                            .pending
                            .get(2..6)
                            .and_then(|h| u16::from_str_radix(h, 16).ok())
                            .is_some_and(|u| (0xD800..0xDC00).contains(&u));
                    let mut len = if pair { 12 } else { len };
                    if self.pending.len() < len {
                        break;
                    }
                    // Not an escape JSON has (text the grammar did not hold to): as it is,
                    // to a character boundary.
                    while !self.pending.is_char_boundary(len) {
                        len += 1;
                    }
                    match serde_json::from_str::<String>(&format!("\"{}\"", &self.pending[..len])) {
                        Ok(s) => out.push_str(&s),
                        Err(_) => out.push_str(&self.pending[..len]),
                    }
                    len
                }
                _ => {
                    let end = self.pending.find(['"', '\\']).unwrap_or(self.pending.len());
                    out.push_str(&self.pending[..end]);
                    end
                }
            };
            self.pending.drain(..take);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the pieces, the decoded input is the string the arguments hold.
    #[test]
    fn streamed_custom_inputs_decode_as_they_come() {
        let input = "*** Begin Patch\n+say \"hi\" \\ \u{1} \u{1F600} é\n*** End Patch\n";
        let arguments = format!("{{\"input\": {}}}", serde_json::to_string(input).unwrap());
        let arguments = arguments.replace('\u{1F600}', "\\ud83d\\ude00");
        for size in 1..8 {
            let mut d = InputDecoder::default();
            let chars: Vec<char> = arguments.chars().collect();
            let out: String = chars
                .chunks(size)
                .map(|c| d.push(&c.iter().collect::<String>()))
                .collect();
            assert_eq!(out, input, "pieces of {size}");
        }
        assert_eq!(custom_input(&arguments), input);
        assert_eq!(custom_input(&custom_arguments(input)), input);
    }

    /// Arguments that are not the JSON the grammar makes (an unconstrained answer) are
    /// decoded as far as they go, never a panic.
    #[test]
    fn malformed_inputs_do_not_panic() {
        for text in [
            "{\"input\": \"\\é\\u12é4\\ud800x\"}",
            "{\"input\": \"a\\",
            "no colon",
            "{\"input\": \"\\ud83d\\u00e9é",
        ] {
            for size in 1..4 {
                let mut d = InputDecoder::default();
                let chars: Vec<char> = text.chars().collect();
                for c in chars.chunks(size) {
                    d.push(&c.iter().collect::<String>());
                }
            }
        }
    }

    #[test]
    fn engine_fields_are_named_as_the_client_sent_them() {
        let e = ApiError::invalid_param("max_tokens", "too many");
        match RESPONSES_FIELDS.rename(e) {
            ApiError::InvalidRequest { param, .. } => assert_eq!(param.as_deref(), Some("max_output_tokens")),
            other => panic!("{other:?}"),
        }
        match MESSAGES_FIELDS.rename(ApiError::invalid_param("stop", "x")) {
            ApiError::InvalidRequest { param, .. } => assert_eq!(param.as_deref(), Some("stop_sequences")),
            other => panic!("{other:?}"),
        }
    }
}
