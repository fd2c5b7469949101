//! vLLM's `POST /tokenize` and `POST /detokenize`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A `prompt` (tokenized as completions tokenizes it), or chat `messages` (rendered
/// with the chat template and tokenized as chat does, so `count` is what a chat request
/// would report as `prompt_tokens`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// Optional; when given, it must be the served model.
    pub model: Option<String>,
    pub prompt: Option<String>,
    /// Chat messages, as `/v1/chat/completions` takes them.
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<Vec<serde_json::Value>>,
    /// For `prompt`: add the tokenizer's special tokens (BOS), as completions do
    /// (default true). Chat messages are rendered by the template, which writes its own.
    pub add_special_tokens: Option<bool>,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The context length.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}
