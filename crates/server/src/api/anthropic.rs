//! Anthropic's Messages API (`POST /v1/messages`): its request and response types, and
//! the request's conversion into the [`Conversation`] every API shares (the answer comes
//! back as Anthropic's content blocks).

use moeserve_core::engine::SamplingParams;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::conversation::{Call, Conversation, Message as Turn, Role, MESSAGES_FIELDS};
use crate::api::requests::null_as_default;
use crate::api::tools::{Functions, ToolChoice, ToolPlan};
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

/// The conversation's messages: `system` first; a user turn's tool results as tool
/// messages (they answer the previous turn's calls), then its text; an assistant turn's
/// text and its `tool_use` blocks as calls.
fn messages_of(system: Option<&SystemPrompt>, messages: &[InputMessage]) -> Result<Vec<Turn>, ApiError> {
    let mut out = Vec::new();
    match system {
        Some(SystemPrompt::Text(t)) => out.push(Turn::new(Role::System, t.clone())),
        Some(SystemPrompt::Blocks(b)) => out.push(Turn::new(Role::System, text_of_blocks(b, "system")?)),
        None => {}
    }
    if messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid_param(
                    &format!("{param}.role"),
                    format!("unknown role {other:?} (user, assistant or system)"),
                ))
            }
        };
        let blocks = match &m.content {
            MessageContent::Text(t) => {
                out.push(Turn::new(role, t.clone()));
                continue;
            }
            MessageContent::Blocks(b) if role == Role::System => {
                out.push(Turn::new(role, text_of_blocks(b, &format!("{param}.content"))?));
                continue;
            }
            MessageContent::Blocks(b) => b,
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("{param}.content[{j}]");
            let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "text" => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                "tool_use" if role == Role::Assistant => {
                    let (Some(id), Some(name)) = (
                        b.get("id").and_then(Value::as_str),
                        b.get("name").and_then(Value::as_str),
                    ) else {
                        return Err(ApiError::invalid_param(&at, "a tool_use block needs an id and a name"));
                    };
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(Call {
                        id: id.to_string(),
                        name: name.to_string(),
                        arguments: input.to_string(),
                    });
                }
                "tool_result" if role == Role::User => {
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
                    results.push(Turn::tool_result(id, content));
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
        if role == Role::Assistant {
            let mut msg = Turn::new(Role::Assistant, text);
            msg.calls = calls;
            out.push(msg);
        } else {
            let only_results = !results.is_empty() && text.is_empty();
            out.extend(results);
            if !only_results {
                out.push(Turn::new(Role::User, text));
            }
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

/// `tools` and `tool_choice`, resolved (`None`: no tool offered).
fn tool_plan(tools: Option<&[Tool]>, choice: Option<&Value>) -> Result<Option<ToolPlan>, ApiError> {
    let mut functions = Functions::default();
    for (i, t) in tools.unwrap_or(&[]).iter().enumerate() {
        // A deferred tool is found by the client's tool search; Anthropic's server tools
        // (web search, code execution, ..) and its schema-less built-in client tools
        // (bash, text editor, computer) cannot be offered to the served model: all are
        // left out, not refused.
        if t.defer_loading == Some(true) || t.kind.as_deref().is_some_and(|k| k != "custom") {
            continue;
        }
        let Some(schema) = &t.input_schema else {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].input_schema"),
                "a tool needs input_schema",
            ));
        };
        functions.function(
            Some(&t.name),
            t.description.as_deref(),
            Some(schema),
            &format!("tools[{i}].name"),
            &format!("tools[{i}].input_schema"),
        )?;
    }
    if functions.list.is_empty() {
        return Ok(None);
    }
    let (choice, parallel) = match choice.filter(|c| !c.is_null()) {
        None => (ToolChoice::Auto, None),
        Some(c) => {
            let parallel = match c.get("disable_parallel_tool_use").and_then(Value::as_bool) {
                Some(true) => Some(false),
                _ => None,
            };
            let choice = match c.get("type").and_then(Value::as_str) {
                Some("auto") => ToolChoice::Auto,
                Some("any") => ToolChoice::Required,
                Some("none") => ToolChoice::None,
                Some("tool") => match c.get("name").and_then(Value::as_str) {
                    Some(name) => ToolChoice::Named(name.to_string()),
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
    ToolPlan::new(functions.list, choice, parallel, "tool_choice.name").map(Some)
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

/// A conversation with Messages' field names and limits.
fn conversation(
    model: &str,
    messages: Vec<Turn>,
    tools: Option<ToolPlan>,
    params: SamplingParams,
    temperature_set: bool,
    budget: Option<usize>,
) -> Conversation {
    Conversation {
        model: model.to_string(),
        messages,
        tools,
        params,
        temperature_set,
        format: None,
        max_reasoning_tokens: budget,
        reasoning_field: "thinking.budget_tokens",
        clamp_max_tokens: true,
        fields: &MESSAGES_FIELDS,
    }
}

impl MessagesRequest {
    /// The conversation this request is: `reasons` says whether the served model thinks
    /// (a thinking budget applies only then).
    pub fn to_conversation(&self, reasons: bool) -> Result<Conversation, ApiError> {
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
        let tools = tool_plan(self.tools.as_deref(), self.tool_choice.as_ref())?;
        let budget = thinking_budget(self.thinking.as_ref())?.filter(|_| reasons);
        let d = SamplingParams::default();
        let params = SamplingParams {
            max_tokens: Some(self.max_tokens),
            stop: self.stop_sequences.clone().unwrap_or_default(),
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            ..d
        };
        Ok(conversation(
            &self.model,
            messages_of(self.system.as_ref(), &self.messages)?,
            tools,
            params,
            self.temperature.is_some(),
            budget,
        ))
    }
}

impl CountTokensRequest {
    pub fn to_conversation(&self) -> Result<Conversation, ApiError> {
        let tools = tool_plan(self.tools.as_deref(), self.tool_choice.as_ref())?;
        thinking_budget(self.thinking.as_ref())?;
        Ok(conversation(
            &self.model,
            messages_of(self.system.as_ref(), &self.messages)?,
            tools,
            SamplingParams::default(),
            false,
            None,
        ))
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
        let conv = r.to_conversation(false).unwrap();
        let msgs = Value::Array(conv.template_messages());
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
        let tools = conv.tools.as_ref().unwrap();
        assert_eq!(tools.choice, ToolChoice::Required);
        assert!(!tools.parallel);
        assert_eq!(conv.params.max_tokens, Some(9));
        assert_eq!(conv.params.stop, ["END"]);
    }

    #[test]
    fn what_is_refused_names_its_field() {
        let param = |v: Value| match req(v).to_conversation(true) {
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
            hosted.to_conversation(true).unwrap().tools.is_none(),
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
        // The budget reaches the conversation only for a model that thinks.
        let r = req(base(
            json!({"thinking": {"type": "enabled", "budget_tokens": 64}}),
        ));
        assert_eq!(r.to_conversation(true).unwrap().max_reasoning_tokens, Some(64));
        assert_eq!(r.to_conversation(false).unwrap().max_reasoning_tokens, None);
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
        let chat = req(body.clone()).to_conversation(false).unwrap();
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
        .to_conversation(false)
        .unwrap();
        let tool = chat.messages.iter().find(|m| m.role == Role::Tool).unwrap();
        assert_eq!(tool.content, "a screenshot\n[image omitted]");
    }
}
