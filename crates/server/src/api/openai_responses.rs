//! OpenAI's Responses API (`POST /v1/responses`): its request, the response object, the
//! stream's events, and the request's translation into a chat request (input items
//! become chat messages; the answer's blocks become output items).

use std::collections::HashMap;

use moeserve_core::engine::SamplingParams;
use moeserve_core::grammar::ConstraintSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::conversation::{custom_arguments, Call, Conversation, Message, Role, RESPONSES_FIELDS};
use crate::api::requests::null_as_default;
use crate::api::structured::schema_spec;
use crate::api::tools::{Functions, ToolChoice, ToolPlan};
use crate::error::ApiError;

/// `POST /v1/responses`
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    pub model: String,
    /// A string (one user message) or a list of items: messages (`input_text` parts),
    /// `function_call` and `function_call_output` items; `reasoning` items of earlier
    /// turns are accepted and left out.
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// A system message for this response only (not carried to the next by
    /// `previous_response_id`).
    pub instructions: Option<String>,
    pub max_output_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extensions as on chat: vLLM's `top_k`, and a `seed`.
    pub top_k: Option<i32>,
    pub seed: Option<i64>,
    /// Function tools (`{"type": "function", "name", "description", "parameters"}`),
    /// custom tools (`{"type": "custom", "name", "description", "format"}`: free-form
    /// input, constrained by a Lark or regex grammar), also grouped in a `namespace`
    /// (offered by their own names; a call to one says its namespace). Hosted tools
    /// moeserve cannot run ([`HOSTED_TOOLS`]: web search, file search, ..) are left out
    /// of the prompt, not refused.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{"type": "function", "name": ..}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ..}}`
    #[schema(value_type = Option<Object>)]
    pub text: Option<Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// Keep the response so `previous_response_id` can continue it (default true).
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    /// Refused when true: background mode is not supported.
    pub background: Option<bool>,
    /// Accepted; the effort is not adjustable.
    #[schema(value_type = Option<Object>)]
    pub reasoning: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Refused: the Conversations API is not supported (use `previous_response_id`).
    #[schema(value_type = Option<Object>)]
    pub conversation: Option<Value>,
    /// Refused: stored prompt templates are not supported.
    #[schema(value_type = Option<Object>)]
    pub prompt: Option<Value>,
    pub max_tool_calls: Option<usize>,
}

/// Tool types OpenAI runs on its side (and `local_shell`, `shell`, `apply_patch`,
/// `tool_search`: built-in tools whose calls are items of their own, not offered):
/// accepted and left out of the prompt, since agents send them in every request whatever
/// the model (Codex sends `web_search`).
pub const HOSTED_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "computer_use",
    "computer_use_preview",
    "code_interpreter",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
    "tool_search",
];

/// How a `compaction` item's `encrypted_content` starts when moeserve wrote it: the
/// summary follows as plain text (nothing here is secret from the client that sent the
/// conversation; the name is OpenAI's).
pub const COMPACTION_PREFIX: &str = "moeserve-compaction-v1:";

/// What the model reads before a summary when the compacted conversation comes back.
pub const COMPACTION_INTRO: &str = "Summary of the conversation so far:\n";

/// What the model is asked to write when a conversation is compacted.
pub const COMPACTION_PROMPT: &str = "Summarize the conversation above for yourself, to continue it \
    later without it: the task, what has been done and found (files, commands, results), \
    decisions made, and what remains to do. Write only the summary.";

/// `POST /v1/responses/compact`: a conversation (`input`, after the stored one of
/// `previous_response_id`) to shorten into the items that replace it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompactRequest {
    pub model: String,
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub previous_response_id: Option<String>,
}

/// The compacted conversation: the user's messages as they were, then one `compaction`
/// item holding the model's summary of the rest (send `output` back as the start of the
/// next `input`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompactResponse {
    pub id: String,
    /// `response.compaction`
    pub object: String,
    pub created_at: u64,
    #[schema(value_type = Vec<Object>)]
    pub output: Vec<Value>,
    pub usage: ResponseUsage,
}

/// A tool output's content: a string, or parts of which the text ones are read (an
/// image a tool returns is noted as left out: the served models read text).
fn output_text(output: Option<&Value>) -> String {
    match output {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (_, Some(t)) => t.to_string(),
                    (kind, None) => format!("[{} omitted]", kind.unwrap_or("part")),
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn refuse(param: &str, what: &str) -> ApiError {
    ApiError::invalid_param(param, format!("{what} is not supported"))
}

/// A message item's content: a string, or `input_text` / `output_text` parts.
fn item_text(content: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("refusal") => text.push_str(p.get("refusal").and_then(Value::as_str).unwrap_or("")),
                    other => {
                        return Err(ApiError::invalid_param(
                            &format!("{param}[{j}].type"),
                            format!(
                                "content parts of type {} are not supported (only text)",
                                other.unwrap_or("(none)")
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid_param(
            param,
            "content must be a string or a list of parts",
        )),
    }
}

/// The input items, read: the messages, and the tools `additional_tools` items offer
/// (Codex's code mode sends its tools that way), with where each list was.
#[derive(Debug, Default)]
pub struct Input {
    pub messages: Vec<Message>,
    pub tools: Vec<(String, Vec<Value>)>,
}

/// The input as the conversation's messages. Consecutive `function_call` and
/// `custom_tool_call` items join the assistant message before them, as one turn's calls.
pub fn read_input(input: &Value) -> Result<Input, ApiError> {
    let items = match input {
        Value::String(s) => {
            return Ok(Input {
                messages: vec![Message::new(Role::User, s.clone())],
                tools: vec![],
            })
        }
        Value::Array(items) => items,
        _ => {
            return Err(ApiError::invalid_param(
                "input",
                "input must be a string or a list of items",
            ))
        }
    };
    let mut out = Input::default();
    let messages = &mut out.messages;
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            Some("message") | None if item.get("role").is_some() => {
                let role = match item["role"].as_str().unwrap_or("") {
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    "system" | "developer" => Role::System,
                    other => {
                        return Err(ApiError::invalid_param(
                            &format!("{at}.role"),
                            format!("unknown role {other:?} (user, assistant, system or developer)"),
                        ))
                    }
                };
                let text = item_text(item.get("content"), &format!("{at}.content"))?;
                messages.push(Message::new(role, text));
            }
            Some(kind @ ("function_call" | "custom_tool_call")) => {
                let (Some(call_id), Some(name)) = (
                    item.get("call_id").and_then(Value::as_str),
                    item.get("name").and_then(Value::as_str),
                ) else {
                    return Err(ApiError::invalid_param(
                        &at,
                        format!("a {kind} item needs call_id and name"),
                    ));
                };
                // A custom tool's free-form input, as the arguments the model wrote.
                let arguments = if kind == "custom_tool_call" {
                    custom_arguments(item.get("input").and_then(Value::as_str).unwrap_or(""))
                } else {
                    item.get("arguments").and_then(Value::as_str).unwrap_or("{}").to_string()
                };
                Message::push_call(
                    messages,
                    Call {
                        id: call_id.to_string(),
                        name: name.to_string(),
                        arguments,
                    },
                );
            }
            Some(kind @ ("function_call_output" | "custom_tool_call_output")) => {
                let Some(call_id) = item.get("call_id").and_then(Value::as_str) else {
                    return Err(ApiError::invalid_param(
                        &format!("{at}.call_id"),
                        format!("a {kind} item needs the call_id it answers"),
                    ));
                };
                messages.push(Message::tool_result(call_id, output_text(item.get("output"))));
            }
            // A summary moeserve wrote (`POST /v1/responses/compact`) stands for the
            // conversation before it; another server's opaque blob is left out.
            Some("compaction") => {
                if let Some(summary) = item
                    .get("encrypted_content")
                    .and_then(Value::as_str)
                    .and_then(|c| c.strip_prefix(COMPACTION_PREFIX))
                {
                    messages.push(Message::new(Role::System, format!("{COMPACTION_INTRO}{summary}")));
                }
            }
            // Tools offered from here on (Codex's code mode): offered with the request's.
            Some("additional_tools") => {
                let Some(Value::Array(tools)) = item.get("tools") else {
                    return Err(ApiError::invalid_param(
                        &format!("{at}.tools"),
                        "an additional_tools item needs its list of tools",
                    ));
                };
                out.tools.push((format!("{at}.tools"), tools.clone()));
            }
            // Earlier turns' thoughts are not shown to the model again (their
            // `encrypted_content` is not ours to read); hosted tools' calls and results
            // never came from moeserve and mean nothing to the model.
            Some(
                "reasoning" | "web_search_call" | "file_search_call" | "computer_call"
                | "computer_call_output" | "code_interpreter_call" | "image_generation_call"
                | "mcp_call" | "mcp_list_tools" | "mcp_approval_request" | "mcp_approval_response"
                | "local_shell_call" | "local_shell_call_output" | "tool_search_call"
                | "tool_search_output",
            ) => {}
            other => {
                return Err(ApiError::invalid_param(
                    &format!("{at}.type"),
                    format!(
                    "input items of type {} are not supported (message, function_call, function_call_output, custom_tool_call, custom_tool_call_output, reasoning, compaction, additional_tools)",
                    other.unwrap_or("(none)")
                ),
                ))
            }
        }
    }
    if out.messages.is_empty() {
        return Err(ApiError::invalid_param("input", "input must not be empty"));
    }
    Ok(out)
}

/// Adds the tools of one list (`at` is where it is) to `functions`: function and custom
/// tools, also inside a `namespace` (offered by their own names); hosted tools are left
/// out.
fn read_tools(list: &[Value], at: &str, functions: &mut Functions) -> Result<(), ApiError> {
    for (i, t) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let name = t.get("name").and_then(Value::as_str);
        let description = t.get("description").and_then(Value::as_str);
        match t.get("type").and_then(Value::as_str) {
            Some("function") => functions.function(
                name,
                description,
                t.get("parameters"),
                &format!("{at}.name"),
                &format!("{at}.parameters"),
            )?,
            Some("custom") => functions.custom(name, description, t.get("format"), &at)?,
            Some("namespace") => {
                let Some(Value::Array(inner)) = t.get("tools") else {
                    return Err(ApiError::invalid_param(
                        &format!("{at}.tools"),
                        "a namespace needs its list of tools",
                    ));
                };
                read_tools(inner, &format!("{at}.tools"), functions)?;
            }
            Some(kind) if HOSTED_TOOLS.contains(&kind) => {}
            other => {
                return Err(ApiError::invalid_param(
                    &format!("{at}.type"),
                    format!(
                    "unknown tool type {} (function, custom, namespace, or a hosted tool, which is left out)",
                    other.unwrap_or("(none)")
                ),
                ))
            }
        }
    }
    Ok(())
}

/// The namespace of each function offered inside one, by name.
fn namespaces_of(list: &[Value], namespace: Option<&str>, out: &mut HashMap<String, String>) {
    for t in list {
        match (
            t.get("type").and_then(Value::as_str),
            t.get("name").and_then(Value::as_str),
        ) {
            (Some("namespace"), Some(ns)) => {
                if let Some(Value::Array(inner)) = t.get("tools") {
                    namespaces_of(inner, Some(ns), out);
                }
            }
            (Some(_), Some(name)) => {
                if let Some(ns) = namespace {
                    out.insert(name.to_string(), ns.to_string());
                }
            }
            _ => {}
        }
    }
}

impl ResponsesRequest {
    /// Refuses what is not supported (400s naming the field).
    pub fn check(&self) -> Result<(), ApiError> {
        if self.background == Some(true) {
            return Err(refuse("background", "background mode"));
        }
        if self.conversation.as_ref().is_some_and(|c| !c.is_null()) {
            return Err(refuse("conversation", "the Conversations API"));
        }
        if self.prompt.as_ref().is_some_and(|p| !p.is_null()) {
            return Err(refuse("prompt", "a stored prompt template"));
        }
        if self.input.is_none() {
            return Err(ApiError::invalid_param("input", "input is required"));
        }
        Ok(())
    }

    /// The namespace of each function offered inside one (in `tools` or in `input`'s
    /// additional tools), by function name: its calls say it.
    pub fn function_namespaces(&self, input: &Input) -> HashMap<String, String> {
        let mut out = HashMap::new();
        namespaces_of(self.tools.as_deref().unwrap_or(&[]), None, &mut out);
        for (_, list) in &input.tools {
            namespaces_of(list, None, &mut out);
        }
        out
    }

    /// `tool_choice`, resolved.
    fn tool_choice(&self) -> Result<ToolChoice, ApiError> {
        Ok(match &self.tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => ToolChoice::from_mode(s, "tool_choice")?,
            Some(c) => {
                match (
                    c.get("type").and_then(Value::as_str),
                    c.get("name").and_then(Value::as_str),
                ) {
                    (Some("function" | "custom"), Some(name)) => ToolChoice::Named(name.to_string()),
                    // The subset is not enforced: its mode is.
                    (Some("allowed_tools"), _) => match c.get("mode").and_then(Value::as_str) {
                        Some("required") => ToolChoice::Required,
                        _ => ToolChoice::Auto,
                    },
                    // A hosted tool forced: it is not offered, so the model answers as it
                    // chooses.
                    (Some(kind), _) if HOSTED_TOOLS.contains(&kind) => ToolChoice::Auto,
                    _ => return Err(ApiError::invalid_param(
                        "tool_choice",
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ..}",
                    )),
                }
            }
        })
    }

    /// `text.format` as the answer's format.
    fn format(&self) -> Result<Option<(ConstraintSpec, &'static str)>, ApiError> {
        let Some(format) = self
            .text
            .as_ref()
            .and_then(|t| t.get("format"))
            .filter(|f| !f.is_null())
        else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some((ConstraintSpec::JsonObject, "text.format"))),
            Some("json_schema") => {
                let field = "text.format.schema";
                let schema = format
                    .get("schema")
                    .cloned()
                    .ok_or_else(|| ApiError::invalid_param(field, "json_schema needs a schema"))?;
                Ok(Some((schema_spec(schema, field)?, field)))
            }
            _ => Err(ApiError::invalid_param(
                "text.format.type",
                "text.format.type must be text, json_object or json_schema",
            )),
        }
    }

    /// The conversation for `history` (the stored turns `previous_response_id`
    /// continues) and this `input`, with `instructions` as its system message.
    pub fn to_conversation(&self, history: Vec<Message>, input: Input) -> Result<Conversation, ApiError> {
        let mut messages = Vec::with_capacity(history.len() + input.messages.len() + 1);
        if let Some(i) = &self.instructions {
            messages.push(Message::new(Role::System, i.clone()));
        }
        messages.extend(history);
        messages.extend(input.messages);
        let mut functions = Functions::default();
        read_tools(self.tools.as_deref().unwrap_or(&[]), "tools", &mut functions)?;
        for (at, list) in &input.tools {
            read_tools(list, at, &mut functions)?;
        }
        let choice = self.tool_choice()?;
        // Only hosted tools (or none): nothing is offered, and a choice means nothing.
        let tools = if functions.list.is_empty() {
            None
        } else {
            Some(ToolPlan::new(
                functions.list,
                choice,
                self.parallel_tool_calls,
                "tool_choice",
            )?)
        };
        let d = SamplingParams::default();
        let params = SamplingParams {
            max_tokens: self.max_output_tokens,
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            seed: self.seed.map(|s| s as u64),
            ..d
        };
        Ok(Conversation {
            model: self.model.clone(),
            messages,
            tools,
            params,
            temperature_set: self.temperature.is_some(),
            format: self.format()?,
            max_reasoning_tokens: None,
            reasoning_field: "reasoning",
            clamp_max_tokens: true,
            fields: &RESPONSES_FIELDS,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseStatus {
    InProgress,
    Completed,
    Incomplete,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    InProgress,
    Completed,
    Incomplete,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct OutputText {
    /// `output_text`
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    #[schema(value_type = Vec<Object>)]
    pub annotations: Vec<Value>,
    #[schema(value_type = Vec<Object>)]
    pub logprobs: Vec<Value>,
}

impl OutputText {
    pub fn new(text: String) -> Self {
        OutputText {
            kind: "output_text".into(),
            text,
            annotations: vec![],
            logprobs: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReasoningText {
    /// `reasoning_text`
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

/// An item of the output, in the order the model wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// A reasoning model's thought (as `reasoning_text` content; no summary).
    Reasoning {
        id: String,
        #[schema(value_type = Vec<Object>)]
        summary: Vec<Value>,
        content: Vec<ReasoningText>,
        status: ItemStatus,
    },
    Message {
        id: String,
        status: ItemStatus,
        /// `assistant`
        role: String,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        /// The namespace of a function offered inside one.
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        arguments: String,
        status: ItemStatus,
    },
    /// A custom tool's call: its free-form input.
    CustomToolCall {
        id: String,
        call_id: String,
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        input: String,
        status: ItemStatus,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    /// Tokens of the thought.
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct IncompleteDetails {
    /// `max_output_tokens`
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

/// The response object.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    /// `response`
    pub object: String,
    pub created_at: u64,
    pub status: ResponseStatus,
    pub background: bool,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<usize>,
    pub max_tool_calls: Option<usize>,
    pub model: String,
    pub output: Vec<OutputItem>,
    /// The text of the output's messages, joined (what the SDKs call `output_text`).
    pub output_text: String,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    #[schema(value_type = Object)]
    pub reasoning: Value,
    pub store: bool,
    pub temperature: Option<f32>,
    #[schema(value_type = Object)]
    pub text: Value,
    /// `none`, `auto`, `required` or the named function.
    #[schema(value_type = Value)]
    pub tool_choice: Value,
    #[schema(value_type = Vec<Object>)]
    pub tools: Value,
    pub top_p: Option<f32>,
    /// `disabled`: a conversation too long for the context is an error.
    pub truncation: String,
    /// `null` until the response ends.
    pub usage: Option<ResponseUsage>,
    #[schema(value_type = Object)]
    pub metadata: Value,
}

impl ResponseObject {
    /// A response to `req`, in progress, with no output yet.
    pub fn start(id: String, model: String, req: &ResponsesRequest) -> Self {
        ResponseObject {
            id,
            object: "response".into(),
            created_at: crate::api::unix_now(),
            status: ResponseStatus::InProgress,
            background: false,
            error: None,
            incomplete_details: None,
            instructions: req.instructions.clone(),
            max_output_tokens: req.max_output_tokens,
            max_tool_calls: req.max_tool_calls,
            model,
            output: vec![],
            output_text: String::new(),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            previous_response_id: req.previous_response_id.clone(),
            reasoning: json!({"effort": req.reasoning.as_ref().and_then(|r| r.get("effort")).cloned(), "summary": null}),
            store: req.store.unwrap_or(true),
            temperature: req.temperature,
            text: req
                .text
                .clone()
                .filter(|t| t.get("format").is_some_and(|f| !f.is_null()))
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            tool_choice: req
                .tool_choice
                .clone()
                .filter(|c| !c.is_null())
                .unwrap_or_else(|| json!("auto")),
            tools: req.tools.clone().map(Value::from).unwrap_or_else(|| json!([])),
            top_p: req.top_p,
            truncation: "disabled".into(),
            usage: None,
            metadata: req
                .metadata
                .clone()
                .filter(|m| !m.is_null())
                .unwrap_or_else(|| json!({})),
        }
    }
}

/// The events of a streamed response (the SSE event name is the `type`), each with its
/// place in the stream.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type")]
pub enum ResponseStreamEvent {
    #[serde(rename = "response.created")]
    Created {
        sequence_number: u64,
        response: ResponseObject,
    },
    #[serde(rename = "response.in_progress")]
    InProgress {
        sequence_number: u64,
        response: ResponseObject,
    },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded {
        sequence_number: u64,
        output_index: usize,
        item: OutputItem,
    },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone {
        sequence_number: u64,
        output_index: usize,
        item: OutputItem,
    },
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        content_index: usize,
        part: OutputText,
    },
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        content_index: usize,
        part: OutputText,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        content_index: usize,
        delta: String,
        #[schema(value_type = Vec<Object>)]
        logprobs: Vec<Value>,
    },
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        content_index: usize,
        text: String,
        #[schema(value_type = Vec<Object>)]
        logprobs: Vec<Value>,
    },
    #[serde(rename = "response.reasoning_text.delta")]
    ReasoningTextDelta {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        content_index: usize,
        delta: String,
    },
    #[serde(rename = "response.reasoning_text.done")]
    ReasoningTextDone {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        content_index: usize,
        text: String,
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    FunctionCallArgumentsDelta {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        delta: String,
    },
    #[serde(rename = "response.function_call_arguments.done")]
    FunctionCallArgumentsDone {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        name: String,
        arguments: String,
    },
    #[serde(rename = "response.custom_tool_call_input.delta")]
    CustomToolCallInputDelta {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        delta: String,
    },
    #[serde(rename = "response.custom_tool_call_input.done")]
    CustomToolCallInputDone {
        sequence_number: u64,
        item_id: String,
        output_index: usize,
        input: String,
    },
    #[serde(rename = "response.completed")]
    Completed {
        sequence_number: u64,
        response: ResponseObject,
    },
    #[serde(rename = "response.incomplete")]
    Incomplete {
        sequence_number: u64,
        response: ResponseObject,
    },
    #[serde(rename = "response.failed")]
    Failed {
        sequence_number: u64,
        response: ResponseObject,
    },
}

impl ResponseStreamEvent {
    /// The SSE event name (the `type`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "response.created",
            Self::InProgress { .. } => "response.in_progress",
            Self::OutputItemAdded { .. } => "response.output_item.added",
            Self::OutputItemDone { .. } => "response.output_item.done",
            Self::ContentPartAdded { .. } => "response.content_part.added",
            Self::ContentPartDone { .. } => "response.content_part.done",
            Self::OutputTextDelta { .. } => "response.output_text.delta",
            Self::OutputTextDone { .. } => "response.output_text.done",
            Self::ReasoningTextDelta { .. } => "response.reasoning_text.delta",
            Self::ReasoningTextDone { .. } => "response.reasoning_text.done",
            Self::FunctionCallArgumentsDelta { .. } => "response.function_call_arguments.delta",
            Self::FunctionCallArgumentsDone { .. } => "response.function_call_arguments.done",
            Self::CustomToolCallInputDelta { .. } => "response.custom_tool_call_input.delta",
            Self::CustomToolCallInputDone { .. } => "response.custom_tool_call_input.done",
            Self::Completed { .. } => "response.completed",
            Self::Incomplete { .. } => "response.incomplete",
            Self::Failed { .. } => "response.failed",
        }
    }
}

/// `DELETE /v1/responses/{id}`'s answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeletedResponse {
    pub id: String,
    /// `response.deleted`
    pub object: String,
    pub deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).unwrap()
    }

    /// The input's messages as the template takes them.
    fn input_messages(input: &Value) -> Result<Vec<Value>, ApiError> {
        Ok(read_input(input)?
            .messages
            .iter()
            .map(Message::template_value)
            .collect())
    }

    /// The request's conversation (no stored history).
    fn conversation(r: &ResponsesRequest) -> Result<Conversation, ApiError> {
        r.check()?;
        r.to_conversation(vec![], read_input(r.input.as_ref().unwrap())?)
    }

    /// Items become the conversation: a message with parts, an assistant message and the
    /// calls after it as one turn, their outputs as tool messages.
    #[test]
    fn input_items_become_chat_messages() {
        let input = json!([
            {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "noon"},
        ]);
        assert_eq!(
            input_messages(&input).unwrap(),
            vec![
                json!({"role": "user", "content": "Weather in Paris?"}),
                json!({"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
                json!({"role": "tool", "tool_call_id": "c2", "content": "noon"}),
            ]
        );
        assert_eq!(
            input_messages(&json!("hi")).unwrap(),
            vec![json!({"role": "user", "content": "hi"})]
        );
    }

    /// Tools, tool_choice and text.format in the conversation; instructions lead.
    #[test]
    fn the_conversation() {
        let r = req(
            json!({"model": "m", "input": "x", "instructions": "Be brief.", "max_output_tokens": 7,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}}}),
        );
        let conv = conversation(&r).unwrap();
        assert_eq!(conv.messages.len(), 2);
        assert_eq!(conv.messages[0].role, Role::System);
        assert_eq!(conv.params.max_tokens, Some(7));
        assert_eq!(conv.tools.as_ref().unwrap().choice, ToolChoice::Named("f".into()));
        assert_eq!(conv.function_names(), ["f"]);
        let (spec, field) = conv.format.unwrap();
        assert_eq!(field, "text.format.schema");
        assert!(matches!(spec, ConstraintSpec::JsonSchema(_)));
    }

    #[test]
    fn what_is_refused_names_its_field() {
        let param = |v: Value| {
            let r = req(v);
            let e = conversation(&r).unwrap_err();
            match e {
                ApiError::InvalidRequest { param, .. } => param,
                other => panic!("{other:?}"),
            }
        };
        let cases = [
            (json!({"background": true}), "background"),
            (json!({"conversation": "conv_1"}), "conversation"),
            (json!({"tools": [{"type": "telepathy"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "namespace", "name": "n", "tools": [{"type": "telepathy"}]}]}),
                "tools[0].tools[0].type",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"type": "item_reference", "id": "x"}]}),
                "input[0].type",
            ),
            (
                json!({"input": [{"type": "function_call_output", "output": "x"}]}),
                "input[0].call_id",
            ),
            (json!({"input": []}), "input"),
            (json!({"text": {"format": {"type": "yaml"}}}), "text.format.type"),
        ];
        for (extra, want) in cases {
            let mut v = json!({"model": "m", "input": "hi"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert_eq!(param(v.clone()), Some(want.to_string()), "{v}");
        }
    }

    /// Codex CLI 0.171.0's first request (`codex exec`, recorded through
    /// tests/agents/recording_proxy.py): function tools, a `namespace` of them, the hosted
    /// `web_search`, `reasoning`, `include`, `store: false`, `prompt_cache_key` and
    /// `client_metadata`. It becomes a chat request offering every function (the
    /// namespace's by their own names) and not web search; calls to the namespace's
    /// functions say their namespace.
    #[test]
    fn codex_first_request() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../../../../tests/fixtures/agents/codex-exec-first-request.json"
        ))
        .unwrap();
        let r = req(recorded["body"].clone());
        r.check().unwrap();
        let chat = conversation(&r).unwrap();
        assert_eq!(
            chat.messages[0].role,
            Role::System,
            "developer messages are instructions"
        );
        assert!(chat.clamp_max_tokens);
        let offered = chat.function_names();
        for name in [
            "exec_command",
            "write_stdin",
            "spawn_agent",
            "wait_agent",
            "update_goal",
        ] {
            assert!(
                offered.iter().any(|o| o == name),
                "{name} not offered: {offered:?}"
            );
        }
        let sent = recorded["body"]["tools"].as_array().unwrap();
        let functions = sent.iter().filter(|t| t["type"] == "function").count()
            + sent
                .iter()
                .filter(|t| t["type"] == "namespace")
                .map(|t| t["tools"].as_array().unwrap().len())
                .sum::<usize>();
        assert_eq!(
            offered.len(),
            functions,
            "web_search is left out, every function offered"
        );
        let namespaces = r.function_namespaces(&read_input(r.input.as_ref().unwrap()).unwrap());
        assert_eq!(
            namespaces.get("spawn_agent").map(String::as_str),
            Some("multi_agent_v1")
        );
        assert_eq!(namespaces.get("exec_command"), None);
    }

    /// What later turns of an agent bring back: reasoning with `encrypted_content`, a
    /// function call with its namespace, an output as parts (an image among them), a
    /// custom tool's call and output, a hosted tool's call; all are read, none refused.
    #[test]
    fn later_turn_items_are_read() {
        let r = req(json!({"model": "m", "input": [
            {"role": "user", "content": "List the files."},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"type": "function_call", "call_id": "c1", "name": "spawn_agent", "namespace": "multi_agent_v1", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": [
                {"type": "input_text", "text": "spawned"}, {"type": "input_image", "image_url": "data:,"}]},
            {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
            {"type": "custom_tool_call_output", "call_id": "c2", "output": "done"},
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        ]}));
        let m = input_messages(r.input.as_ref().unwrap()).unwrap();
        assert_eq!(
            Value::Array(m),
            json!([
                {"role": "user", "content": "List the files."},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "spawn_agent", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "spawned\n[input_image omitted]"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c2", "type": "function", "function": {"name": "apply_patch", "arguments": "{\"input\":\"*** Begin Patch\"}"}}]},
                {"role": "tool", "tool_call_id": "c2", "content": "done"},
            ])
        );
    }

    #[test]
    fn a_forced_hosted_tool_leaves_the_choice_to_the_model() {
        let r = req(json!({"model": "m", "input": "hi",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}, {"type": "web_search"}],
            "tool_choice": {"type": "web_search"}}));
        let chat = conversation(&r).unwrap();
        assert_eq!(chat.tools.unwrap().choice, ToolChoice::Auto);
        let r = req(json!({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}));
        let chat = conversation(&r).unwrap();
        assert!(chat.tools.is_none(), "only hosted tools: nothing offered");
    }

    /// A compaction moeserve wrote stands for the conversation before it, as a system
    /// message with its summary; another server's opaque one is left out.
    #[test]
    fn compaction_items_become_the_summary() {
        let ours =
            json!({"type": "compaction", "encrypted_content": format!("{COMPACTION_PREFIX}Read a.txt.")});
        let theirs = json!({"type": "compaction", "encrypted_content": "gAAAAB..."});
        let m = input_messages(&json!([ours, theirs, {"role": "user", "content": "Go on."}])).unwrap();
        assert_eq!(
            Value::Array(m),
            json!([
                {"role": "system", "content": format!("{COMPACTION_INTRO}Read a.txt.")},
                {"role": "user", "content": "Go on."},
            ])
        );
    }

    /// Codex CLI's custom tools, recorded: `apply_patch` (a Lark grammar, with
    /// `-m gpt-5.5`) is offered as a custom tool; code mode (`-m gpt-6.2-sol`) sends its
    /// tools in an `additional_tools` input item, a namespace holding the custom `exec`
    /// and functions: all offered, calls naming their namespace.
    #[test]
    fn codex_custom_tools_are_offered() {
        let load = |name: &str| -> Value {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/agents")
                .join(name);
            serde_json::from_str::<Value>(&std::fs::read_to_string(path).unwrap()).unwrap()["body"].clone()
        };
        let r = req(load("codex-exec-apply-patch-request.json"));
        let conv = conversation(&r).unwrap();
        let patch = conv
            .tools
            .as_ref()
            .unwrap()
            .functions
            .iter()
            .find(|f| f.name == "apply_patch")
            .unwrap();
        assert!(matches!(
            patch.custom.as_ref().map(|c| &c.form),
            Some(moeserve_core::tools::FreeForm::Lark(g)) if g.contains("begin_patch")
        ));
        assert!(conv.custom_names().contains("apply_patch"));
        assert!(conv.function_names().contains(&"exec_command".to_string()));

        let r = req(load("codex-exec-code-mode-request.json"));
        let input = read_input(r.input.as_ref().unwrap()).unwrap();
        assert_eq!(input.tools.len(), 1);
        let namespaces = r.function_namespaces(&input);
        assert_eq!(namespaces.get("exec").map(String::as_str), Some("functions"));
        assert_eq!(
            namespaces.get("spawn_agent").map(String::as_str),
            Some("collaboration")
        );
        let conv = r.to_conversation(vec![], input).unwrap();
        assert_eq!(conv.custom_names().into_iter().collect::<Vec<_>>(), ["exec"]);
        assert!(conv.function_names().contains(&"sleep".to_string()));
        assert_eq!(conv.messages[0].role, Role::System);
    }

    /// A custom tool's format is checked where it is: an unknown syntax, a grammar that
    /// cannot be escaped, a missing definition.
    #[test]
    fn custom_tool_formats_are_checked() {
        let param = |format: Value| {
            let r = req(json!({"model": "m", "input": "hi", "tools": [
                {"type": "function", "name": "f"}, {"type": "custom", "name": "c", "format": format}]}));
            match conversation(&r) {
                Err(ApiError::InvalidRequest { param, .. }) => param,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            param(json!({"type": "grammar", "syntax": "ebnf", "definition": "x"})).as_deref(),
            Some("tools[1].format.syntax")
        );
        assert_eq!(
            param(json!({"type": "grammar", "syntax": "lark", "definition": "start: <|end|>"})).as_deref(),
            Some("tools[1].format")
        );
        assert_eq!(
            param(json!({"type": "grammar", "syntax": "regex"})).as_deref(),
            Some("tools[1].format.definition")
        );
        let r = req(
            json!({"model": "m", "input": "hi", "tool_choice": {"type": "custom", "name": "c"},
            "tools": [{"type": "custom", "name": "c", "format": {"type": "text"}}]}),
        );
        assert_eq!(
            conversation(&r).unwrap().tools.unwrap().choice,
            ToolChoice::Named("c".into())
        );
    }
}
