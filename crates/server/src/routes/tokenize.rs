//! `POST /tokenize`, `POST /detokenize` (vLLM's): the served model's tokenizer, and its
//! chat template for messages.

use axum::extract::State;
use axum::Json;
use serde_json::json;

use super::chat::prepare_chat;
use super::{token_text, GenerationErrors};
use crate::api::requests::ChatCompletionRequest;
use crate::api::tokenize::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::{LoadedEngine, SharedState};

fn engine<'a>(state: &'a SharedState, model: Option<&str>) -> Result<&'a LoadedEngine, ApiError> {
    match model {
        Some(m) => state.engine_for(m),
        None => state.engine(),
    }
}

#[utoipa::path(post, path = "/tokenize", tag = "tokenizer", request_body = TokenizeRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The tokens.", body = TokenizeResponse),
        GenerationErrors))]
pub async fn tokenize(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let m = engine(&state, req.model.as_deref())?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(prompt), None) => {
            let (codec, prompt, special) = (
                m.engine.codec().clone(),
                prompt.clone(),
                req.add_special_tokens.unwrap_or(true),
            );
            tokio::task::spawn_blocking(move || codec.encode_with(&prompt, special))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::invalid_param("prompt", format!("cannot tokenize: {e}")))?
        }
        (None, Some(messages)) => {
            let chat: ChatCompletionRequest =
                serde_json::from_value(json!({"model": m.id, "messages": messages}))
                    .map_err(|e| ApiError::invalid_param("messages", format!("invalid messages: {e}")))?;
            let conv = chat.to_conversation(state.settings.max_n)?;
            prepare_chat(&state, &conv).await?.prompt
        }
        _ => {
            return Err(ApiError::invalid(
                "send exactly one of `prompt` and `messages`",
                None,
            ))
        }
    };
    let codec = m.engine.codec();
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: m.engine.limits().context_length,
        token_strs: req
            .return_token_strs
            .unwrap_or(false)
            .then(|| tokens.iter().map(|&t| token_text(codec, t)).collect()),
        tokens,
    }))
}

#[utoipa::path(post, path = "/detokenize", tag = "tokenizer", request_body = DetokenizeRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The text of the tokens (special tokens included).", body = DetokenizeResponse),
        GenerationErrors))]
pub async fn detokenize(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let m = engine(&state, req.model.as_deref())?;
    let vocab = m.engine.limits().vocab_size;
    if let Some((i, t)) = req.tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            &format!("tokens[{i}]"),
            format!("token id {t} is out of the vocabulary (0 to {})", vocab - 1),
        ));
    }
    let prompt = m
        .engine
        .codec()
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
