//! Every body the server sends, as types: serialized for the wire and described in the
//! OpenAPI document (`/openapi.json`) from the same definitions.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};
use utoipa::ToSchema;

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl From<moeserve_core::engine::Usage> for Usage {
    fn from(u: moeserve_core::engine::Usage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// Why a choice ended: at a stop condition (EOS, a stop string or id), or at
/// `max_tokens`, the context, the request deadline or a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    /// The answer called tools.
    ToolCalls,
}

impl From<moeserve_core::engine::FinishReason> for FinishReason {
    fn from(r: moeserve_core::engine::FinishReason) -> Self {
        use moeserve_core::engine::FinishReason as F;
        match r {
            F::Stop => FinishReason::Stop,
            // An engine abort fails the request (503) before a finish is written.
            F::Length | F::Abort => FinishReason::Length,
        }
    }
}

/// A stream chunk's `usage`: absent unless `stream_options.include_usage`, then `null` on
/// every chunk but the last, which carries the request's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum UsageSlot {
    #[default]
    Absent,
    Null,
    Present(Usage),
}

impl UsageSlot {
    pub fn is_absent(&self) -> bool {
        matches!(self, UsageSlot::Absent)
    }
}

impl Serialize for UsageSlot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageSlot::Present(u) => u.serialize(s),
            UsageSlot::Absent | UsageSlot::Null => s.serialize_none(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Assistant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ChatCompletionObject {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ChatCompletionChunkObject {
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum TextCompletionObject {
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// `system_fingerprint` of every response: the server's version.
pub const SYSTEM_FINGERPRINT: &str = concat!("moeserve-", env!("CARGO_PKG_VERSION"));

/// What every response and chunk of one generation request shares.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
}

/// A generation body: the fields every response and chunk starts with (`id`, `object`,
/// `created`, `model`, `system_fingerprint`), then its choices and usage.
macro_rules! generation_body {
    ($(#[$doc:meta])* $name:ident, $object:ident :: $variant:ident, $choice:ty, $usage:ty $(, #[$usage_attr:meta])*) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, ToSchema)]
        pub struct $name {
            pub id: String,
            pub object: $object,
            /// Unix seconds.
            pub created: u64,
            pub model: String,
            pub system_fingerprint: String,
            pub choices: Vec<$choice>,
            $(#[$usage_attr])*
            pub usage: $usage,
        }

        impl $name {
            pub fn new(meta: &Meta, choices: Vec<$choice>, usage: $usage) -> Self {
                Self {
                    id: meta.id.clone(),
                    object: $object::$variant,
                    created: meta.created,
                    model: meta.model.clone(),
                    system_fingerprint: SYSTEM_FINGERPRINT.into(),
                    choices,
                    usage,
                }
            }
        }
    };
}

generation_body!(
    /// `POST /v1/chat/completions`, not streamed.
    ChatCompletion, ChatCompletionObject::ChatCompletion, ChatChoice, Usage
);
generation_body!(
    /// One event of a streamed chat completion.
    ChatCompletionChunk, ChatCompletionChunkObject::ChatCompletionChunk, ChatChunkChoice, UsageSlot,
    #[serde(skip_serializing_if = "UsageSlot::is_absent")],
    #[schema(value_type = Option<Usage>)]
);
generation_body!(
    /// `POST /v1/completions`, not streamed.
    Completion, TextCompletionObject::TextCompletion, CompletionChoice, Usage
);
generation_body!(
    /// One event of a streamed completion.
    CompletionChunk, TextCompletionObject::TextCompletion, CompletionChoice, UsageSlot,
    #[serde(skip_serializing_if = "UsageSlot::is_absent")],
    #[schema(value_type = Option<Usage>)]
);

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// Present when `logprobs` was asked for.
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    #[schema(required = true)]
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: Role,
    /// `null` when the answer is only tool calls.
    #[schema(required = true)]
    pub content: Option<String>,
    /// The calls the answer made, when the request offered tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
    /// A reasoning model's thought, apart from the answer (DeepSeek-R1's convention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    #[schema(required = true)]
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to a choice's message.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Tool calls: the first piece of each carries its id, type and name, later ones
    /// more of its arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A tool call of a complete answer: a function's (`function`) or a custom tool's
/// (`custom`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallOut {
    /// `call_` and 24 hex digits.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: ToolType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomCall>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolType {
    Function,
    Custom,
}

/// A custom tool's call: its free-form input.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CustomCall {
    pub name: String,
    pub input: String,
}

/// A piece of a streamed custom tool call.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CustomCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as the model wrote them: a JSON text.
    pub arguments: String,
}

/// A piece of a streamed tool call.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<ToolType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<CustomCallDelta>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// A new tool call id: `call_` and 24 random hex digits.
pub fn tool_call_id() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &hex[..24])
}

/// Chat's `logprobs`: each generated token with its alternatives.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    #[schema(required = true)]
    pub logprobs: Option<CompletionLogprobs>,
    #[schema(required = true)]
    pub finish_reason: Option<FinishReason>,
}

/// The legacy completions `logprobs` object; an echoed prompt's first token has no
/// logprob (`null`).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Where each token starts in the choice's text, in characters (as vLLM counts them).
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ListObject {
    #[serde(rename = "list")]
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ModelObject {
    #[serde(rename = "model")]
    Model,
}

/// `GET /v1/models`
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelCard>,
}

/// `GET /v1/models/{id}`
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: ModelObject,
    pub created: u64,
    pub owned_by: String,
    /// The context length: prompt and output tokens together (vLLM's field).
    pub max_model_len: usize,
}

/// `GET /health`
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok`: the process runs.
    pub status: String,
    /// `loading`, `ready` or `draining`.
    pub model: String,
    /// What the load is doing, while the model loads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<HealthProgress>,
}

/// The step a load is at.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthProgress {
    /// `download` (a file from the Hugging Face hub) or `weights` (reading the weights
    /// into tensors).
    pub stage: String,
    /// The file being downloaded, or the file of the last tensor loaded.
    pub file: String,
    pub done_bytes: u64,
    /// 0 when unknown.
    pub total_bytes: u64,
    /// The same as a sentence, as the log writes it.
    pub message: String,
}

/// `GET /ready` when the model is loaded.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Ready {
    /// `ready`
    pub status: String,
    /// The served model's id.
    pub model: String,
}

/// Every error: OpenAI's shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error` or
    /// `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    #[schema(required = true)]
    pub param: Option<String>,
    /// A machine-readable reason (`context_length_exceeded`, `model_not_found`, ...).
    #[schema(required = true)]
    pub code: Option<String>,
}
