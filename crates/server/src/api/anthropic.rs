//! Anthropic's Messages API (`POST /v1/messages`): its request and response types, and
//! the request's translation into a chat request (the engine sees one kind of
//! conversation; the answer comes back as Anthropic's content blocks).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::requests::{null_as_default, ChatCompletionRequest};
use crate::error::ApiError;

/// `system`: a string or text blocks.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SystemPrompt {
    Text(String),
    Blocks(Vec<Value>),
}

/// A message's `content`: a string or content blocks (`text`, `tool_use`,
/// `tool_result`; `thinking` blocks of earlier turns are accepted and left out).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    #[schema(value_type = Vec<Object>)]
    Blocks(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct InputMessage {
    /// `user` or `assistant`; also `system`, as Claude Code sends it between turns (kept
    /// at its place where the chat template allows, else joined to the system prompt).
    pub role: String,
    pub content: MessageContent,
}

/// A tool the model may call: `name`, `description` and the JSON schema of its input.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct Tool {
    /// `custom` or absent; Anthropic's server tools (web search, code execution, ..) and
    /// built-in client tools (bash, text editor) are left out of the prompt.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub description: Option<String>,
    /// Required for client tools.
    #[schema(value_type = Option<Object>)]
    pub input_schema: Option<Value>,
    /// A deferred tool (`true`) is found by the client's tool search, not shown to the
    /// model up front: it is left out of the prompt.
    pub defer_loading: Option<bool>,
}

/// `POST /v1/messages`
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct MessagesRequest {
    pub model: String,
    /// Required, as in Anthropic's API (thinking tokens count against it).
    pub max_tokens: usize,
    pub messages: Vec<InputMessage>,
    pub system: Option<SystemPrompt>,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub tools: Option<Vec<Tool>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"?, "disable_parallel_tool_use"?}`
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub stream: bool,
    /// `{"type": "enabled", "budget_tokens": N}` caps a reasoning model's thought;
    /// ignored for models that do not reason.
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
    /// Accepted and ignored.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Refused: MCP connectors are not supported.
    #[schema(value_type = Option<Vec<Object>>)]
    pub mcp_servers: Option<Value>,
}

/// `POST /v1/messages/count_tokens`: the fields of a message request that make the
/// prompt.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CountTokensRequest {
    pub model: String,
    pub messages: Vec<InputMessage>,
    pub system: Option<SystemPrompt>,
    pub tools: Option<Vec<Tool>>,
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub thinking: Option<Value>,
}

/// A tool result's content blocks as text: text blocks as they are, anything else
/// (images, documents, tool references) as a short note of what was left out, since the
/// served models read only text and an agent's tool may return an image at any turn.
fn text_of_result_blocks(blocks: &[Value]) -> String {
    blocks
        .iter()
        .map(|b| {
            match (
                b.get("type").and_then(Value::as_str),
                b.get("text").and_then(Value::as_str),
            ) {
                (Some("text"), Some(t)) => t.to_string(),
                (kind, _) => format!("[{} omitted]", kind.unwrap_or("block")),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn text_of_blocks(blocks: &[Value], param: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, b) in blocks.iter().enumerate() {
        match (
            b.get("type").and_then(Value::as_str),
            b.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(t)) => text.push_str(t),
            (kind, _) => {
                return Err(ApiError::invalid_param(
                    &format!("{param}[{j}]"),
                    format!(
                        "expected a text block, got {}",
                        kind.unwrap_or("a block without a type")
                    ),
                ))
            }
        }
    }
    Ok(text)
}

/// The conversation as chat messages: `system` first; a user turn's tool results as
/// tool messages (they answer the previous turn's calls), then its text; an assistant
/// turn's text and its `tool_use` blocks as calls.
fn chat_messages(system: Option<&SystemPrompt>, messages: &[InputMessage]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    match system {
        Some(SystemPrompt::Text(t)) => out.push(json!({"role": "system", "content": t})),
        Some(SystemPrompt::Blocks(b)) => {
            out.push(json!({"role": "system", "content": text_of_blocks(b, "system")?}))
        }
        None => {}
    }
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        if m.role == "system" {
            let text = match &m.content {
                MessageContent::Text(t) => t.clone(),
                MessageContent::Blocks(b) => text_of_blocks(b, &format!("{param}.content"))?,
            };
            out.push(json!({"role": "system", "content": text}));
            continue;
        }
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid_param(
                &format!("{param}.role"),
                format!("unknown role {:?} (user, assistant or system)", m.role),
            ));
        }
        let blocks = match &m.content {
            MessageContent::Text(t) => {
                out.push(json!({"role": m.role, "content": t}));
                continue;
            }
            MessageContent::Blocks(b) => b,
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("{param}.content[{j}]");
            let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                "tool_use" if m.role == "assistant" => {
                    let (Some(id), Some(name)) = (
                        b.get("id").and_then(Value::as_str),
                        b.get("name").and_then(Value::as_str),
                    ) else {
                        return Err(ApiError::invalid_param(&at, "a tool_use block needs an id and a name"));
                    };
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({"id": id, "type": "function",
                        "function": {"name": name, "arguments": input.to_string()}}));
                }
                "tool_result" if m.role == "user" => {
                    let Some(id) = b.get("tool_use_id").and_then(Value::as_str) else {
                        return Err(ApiError::invalid_param(&at, "a tool_result block needs tool_use_id"));
                    };
                    let mut content = match b.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(parts)) => text_of_result_blocks(parts),
                        Some(_) => {
                            return Err(ApiError::invalid_param(
                                &format!("{at}.content"),
                                "tool result content must be a string or text blocks",
                            ))
                        }
                    };
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        content = format!("Error: {content}");
                    }
                    out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
                }
                // Earlier turns' thoughts are not shown to the model again, as chat
                // templates drop them.
                "thinking" | "redacted_thinking" => {}
                other => {
                    return Err(ApiError::invalid_param(
                        &format!("{at}.type"),
                        format!(
                            "{other:?} blocks are not supported in a {} message (text, tool_use from the assistant, tool_result from the user)",
                            m.role
                        ),
                    ))
                }
            }
        }
        if m.role == "assistant" {
            let mut msg = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            out.push(msg);
        } else if !text.is_empty() || !blocks.iter().any(|b| b["type"] == "tool_result") {
            out.push(json!({"role": "user", "content": text}));
        }
    }
    if messages.iter().all(|m| m.role == "system") {
        return Err(ApiError::invalid_param(
            "messages",
            "messages need a user turn; system messages alone are no conversation",
        ));
    }
    Ok(out)
}

/// `tools` and `tool_choice` in chat terms.
fn chat_tools(tools: Option<&[Tool]>, choice: Option<&Value>) -> Result<(Value, Value, Value), ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_empty()) else {
        return Ok((Value::Null, Value::Null, Value::Null));
    };
    let mut out = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        if t.defer_loading == Some(true) {
            continue;
        }
        // Anthropic's server tools (web search, code execution, ..) and its schema-less
        // built-in client tools (bash, text editor, computer) cannot be offered to the
        // served model: they are left out, not refused.
        if t.kind.as_deref().is_some_and(|k| k != "custom") {
            continue;
        }
        let Some(schema) = &t.input_schema else {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].input_schema"),
                "a tool needs input_schema",
            ));
        };
        out.push(json!({"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": schema}}));
    }
    if out.is_empty() {
        return Ok((Value::Null, Value::Null, Value::Null));
    }
    let (choice, parallel) = match choice {
        None | Some(Value::Null) => (Value::Null, Value::Null),
        Some(c) => {
            let parallel = match c.get("disable_parallel_tool_use").and_then(Value::as_bool) {
                Some(true) => json!(false),
                _ => Value::Null,
            };
            let choice = match c.get("type").and_then(Value::as_str) {
                Some("auto") => json!("auto"),
                Some("any") => json!("required"),
                Some("none") => json!("none"),
                Some("tool") => match c.get("name").and_then(Value::as_str) {
                    Some(name) => json!({"type": "function", "function": {"name": name}}),
                    None => {
                        return Err(ApiError::invalid_param(
                            "tool_choice.name",
                            "tool_choice of type tool needs a name",
                        ))
                    }
                },
                _ => {
                    return Err(ApiError::invalid_param(
                        "tool_choice.type",
                        "tool_choice.type must be auto, any, tool or none",
                    ))
                }
            };
            (choice, parallel)
        }
    };
    Ok((Value::Array(out), choice, parallel))
}

/// The thought's budget (`thinking.budget_tokens` when enabled).
fn thinking_budget(thinking: Option<&Value>) -> Result<Option<usize>, ApiError> {
    let Some(t) = thinking.filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    match t.get("type").and_then(Value::as_str) {
        Some("enabled") => match t.get("budget_tokens").and_then(Value::as_u64) {
            Some(b) => Ok(Some(b as usize)),
            None => Err(ApiError::invalid_param(
                "thinking.budget_tokens",
                "enabled thinking needs budget_tokens",
            )),
        },
        Some("disabled") | Some("adaptive") => Ok(None),
        _ => Err(ApiError::invalid_param(
            "thinking.type",
            "thinking.type must be enabled, disabled or adaptive",
        )),
    }
}

fn to_chat(v: Value) -> Result<ChatCompletionRequest, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid request: {e}"), None))
}

impl MessagesRequest {
    /// The chat request this one is: `reasons` says whether the served model thinks (a
    /// thinking budget applies only then).
    pub fn to_chat(&self, reasons: bool) -> Result<ChatCompletionRequest, ApiError> {
        if self.mcp_servers.as_ref().is_some_and(|m| !m.is_null()) {
            return Err(ApiError::invalid_param(
                "mcp_servers",
                "MCP servers are not supported",
            ));
        }
        if self.max_tokens == 0 {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let (tools, tool_choice, parallel) = chat_tools(self.tools.as_deref(), self.tool_choice.as_ref())?;
        let budget = thinking_budget(self.thinking.as_ref())?.filter(|_| reasons);
        let mut chat = to_chat(json!({
            "model": self.model,
            "messages": chat_messages(self.system.as_ref(), &self.messages)?,
            "max_tokens": self.max_tokens,
            "stop": self.stop_sequences,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel,
            "max_reasoning_tokens": budget,
        }))?;
        chat.clamp_max_tokens = true;
        Ok(chat)
    }
}

impl CountTokensRequest {
    pub fn to_chat(&self) -> Result<ChatCompletionRequest, ApiError> {
        let (tools, tool_choice, parallel) = chat_tools(self.tools.as_deref(), self.tool_choice.as_ref())?;
        thinking_budget(self.thinking.as_ref())?;
        to_chat(json!({
            "model": self.model,
            "messages": chat_messages(self.system.as_ref(), &self.messages)?,
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel,
        }))
    }
}

/// A content block of the answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text {
        text: String,
    },
    /// A reasoning model's thought (`signature` is empty: moeserve does not sign).
    Thinking {
        thinking: String,
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[schema(value_type = Object)]
        input: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
}

/// Token counts: `input_tokens` are the prompt tokens not read from the prefix cache,
/// `cache_read_input_tokens` those that were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct MessageUsage {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub cache_creation_input_tokens: usize,
    pub cache_read_input_tokens: usize,
}

impl From<moeserve_core::engine::Usage> for MessageUsage {
    fn from(u: moeserve_core::engine::Usage) -> Self {
        MessageUsage {
            input_tokens: u.prompt_tokens - u.cached_tokens.min(u.prompt_tokens),
            output_tokens: u.completion_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: u.cached_tokens,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    Message,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssistantRole {
    Assistant,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Message {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: MessageType,
    pub role: AssistantRole,
    pub model: String,
    pub content: Vec<ContentBlock>,
    /// `null` in the `message_start` event of a stream.
    pub stop_reason: Option<StopReason>,
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

/// A streamed piece of a content block.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    TextDelta { text: String },
    ThinkingDelta { thinking: String },
    InputJsonDelta { partial_json: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MessageDeltaBody {
    pub stop_reason: Option<StopReason>,
    pub stop_sequence: Option<String>,
}

/// The events of a streamed answer (the SSE event name is the `type`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    MessageStart {
        message: Message,
    },
    ContentBlockStart {
        index: usize,
        content_block: ContentBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: usize,
    },
    /// The end: why, and the final (cumulative) usage.
    MessageDelta {
        delta: MessageDeltaBody,
        usage: MessageUsage,
    },
    MessageStop,
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
        }
    }
}

/// `count_tokens`' answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct TokenCount {
    pub input_tokens: usize,
}

/// Anthropic's error body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AnthropicError {
    /// `error`
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub error: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    /// A tool round trip in Anthropic's blocks becomes the chat conversation the template
    /// knows: system first, the call on the assistant message, the result as a tool
    /// message, then the user's text.
    #[test]
    fn a_tool_conversation_becomes_chat_messages() {
        let r = req(json!({
            "model": "m", "max_tokens": 9,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": ""},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "Thanks"}]},
            ],
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"],
        }));
        let chat = r.to_chat(false).unwrap();
        let msgs = serde_json::to_value(chat.template_messages().unwrap()).unwrap();
        assert_eq!(
            msgs,
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"},
                {"role": "user", "content": "Thanks"},
            ])
        );
        assert_eq!(chat.tool_choice, Some(json!("required")));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        assert_eq!(chat.max_tokens, Some(9));
    }

    #[test]
    fn what_is_refused_names_its_field() {
        let param = |v: Value| match req(v).to_chat(true) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        let base = |extra: Value| {
            let mut v =
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(
            param(base(
                json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
            )),
            Some("messages[0].content[0].type".into())
        );
        let hosted = req(base(
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        ));
        assert!(
            hosted.to_chat(true).unwrap().tools.is_none(),
            "server tools are left out"
        );
        assert_eq!(
            param(base(
                json!({"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "sometimes"}})
            )),
            Some("tool_choice.type".into())
        );
        assert_eq!(
            param(base(json!({"tools": [{"name": "f"}]}))),
            Some("tools[0].input_schema".into())
        );
        assert_eq!(param(base(json!({"max_tokens": 0}))), Some("max_tokens".into()));
        assert_eq!(param(base(json!({"messages": []}))), Some("messages".into()));
        assert_eq!(
            param(base(json!({"thinking": {"type": "enabled"}}))),
            Some("thinking.budget_tokens".into())
        );
        // The budget reaches the chat request only for a model that thinks.
        let r = req(base(
            json!({"thinking": {"type": "enabled", "budget_tokens": 64}}),
        ));
        assert_eq!(r.to_chat(true).unwrap().max_reasoning_tokens, Some(64));
        assert_eq!(r.to_chat(false).unwrap().max_reasoning_tokens, None);
    }

    #[test]
    fn usage_splits_cached_input() {
        let u = MessageUsage::from(moeserve_core::engine::Usage {
            prompt_tokens: 10,
            completion_tokens: 3,
            cached_tokens: 8,
        });
        assert_eq!(
            (u.input_tokens, u.cache_read_input_tokens, u.output_tokens),
            (2, 8, 3)
        );
    }

    /// Claude Code 2.1.337's first request (`claude -p`, recorded through
    /// tests/agents/recording_proxy.py): system blocks with `cache_control`, a `system`
    /// message after the user's turn, a deferred tool, adaptive thinking with `display`,
    /// `context_management`, `output_config`, `metadata.user_id` and `max_tokens: 32000`.
    #[test]
    fn claude_code_first_request() {
        let recorded: Value = serde_json::from_str(include_str!(
            "../../../../tests/fixtures/agents/claude-code-first-request.json"
        ))
        .unwrap();
        let body = &recorded["body"];
        let chat = req(body.clone()).to_chat(false).unwrap();
        assert!(chat.clamp_max_tokens, "32000 is cut to what the context leaves");
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "system"],
            "the system message stays where it was"
        );
        let offered = chat.function_names();
        let sent = body["tools"].as_array().unwrap();
        let deferred: Vec<&str> = sent
            .iter()
            .filter(|t| t["defer_loading"] == true)
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(!deferred.is_empty());
        assert_eq!(offered.len(), sent.len() - deferred.len());
        assert!(offered.iter().all(|o| !deferred.contains(&o.as_str())));
        assert!(offered.iter().any(|o| o == "Bash"));
    }

    /// A tool result may be blocks other than text (an image a tool returned): they are
    /// noted as left out, not refused.
    #[test]
    fn tool_results_with_images_are_read() {
        let chat = req(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "Look"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
                {"type": "text", "text": "a screenshot"}, {"type": "image", "source": {"type": "base64", "data": ""}}]},
                {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "opaque"},
                {"type": "thinking", "thinking": "hm", "signature": "s"}, {"type": "text", "text": "A cat."}]},
        ]}))
        .to_chat(false)
        .unwrap();
        let tool = chat.messages.iter().find(|m| m.role == "tool").unwrap();
        match &tool.content {
            Some(crate::api::requests::MessageContent::Text(t)) => {
                assert_eq!(t, "a screenshot\n[image omitted]")
            }
            other => panic!("{other:?}"),
        }
    }
}
