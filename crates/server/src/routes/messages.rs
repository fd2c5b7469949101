//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API
//! over the shared conversation path (the request becomes a [`Conversation`]; the
//! answer's blocks come from [`Blocks`]). Errors on these routes are in Anthropic's shape
//! (`middleware::anthropic_errors`).
//!
//! [`Conversation`]: crate::api::conversation::Conversation

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moeserve_core::engine::{EngineFailure, FinishReason};
use serde_json::{json, Value};

use super::chat::prepare_chat;
use super::{named_event, respond, Encoder};
use crate::api::anthropic::{
    AnthropicError, AssistantRole, BlockDelta, ContentBlock, CountTokensRequest, Message, MessageDeltaBody,
    MessageType, MessageUsage, MessagesRequest, StopReason, StreamEvent, TokenCount,
};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{Block, BlockEvent, BlockKind, Blocks, Choice, Fold, Update};
use crate::state::SharedState;

fn tool_use_id() -> String {
    format!("toolu_{}", uuid::Uuid::new_v4().simple())
}

/// A block as the answer holds it; `id` is a tool call's.
fn content_block(b: &Block, id: &str) -> ContentBlock {
    match &b.kind {
        BlockKind::Reasoning => ContentBlock::Thinking {
            thinking: b.text.clone(),
            signature: String::new(),
        },
        BlockKind::Text => ContentBlock::Text { text: b.text.clone() },
        BlockKind::Call { name } => ContentBlock::ToolUse {
            id: id.to_string(),
            name: name.clone(),
            // Calls are constrained to their schema, so the arguments are an object;
            // anything else (a call cut off by max_tokens) is no input.
            input: serde_json::from_str::<Value>(&b.text)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({})),
        },
    }
}

/// A block as it opens in a stream: empty.
fn opening_block(b: &Block, id: &str) -> ContentBlock {
    content_block(
        &Block {
            kind: b.kind.clone(),
            text: String::new(),
        },
        id,
    )
}

fn stop_reason(c: &Choice) -> StopReason {
    match c.finish {
        Some(FinishReason::Stop) if !c.calls.is_empty() => StopReason::ToolUse,
        Some(FinishReason::Stop) if c.stop_sequence.is_some() => StopReason::StopSequence,
        Some(FinishReason::Stop) => StopReason::EndTurn,
        _ => StopReason::MaxTokens,
    }
}

/// A message: content blocks from the answer's blocks, streamed as Anthropic's events.
struct MessagesEncoder {
    id: String,
    model: String,
    prompt_tokens: usize,
    blocks: Blocks,
    /// Tool calls' ids, by block.
    ids: Vec<String>,
}

impl MessagesEncoder {
    fn message(&self, content: Vec<ContentBlock>, c: Option<&Choice>, usage: MessageUsage) -> Message {
        Message {
            id: self.id.clone(),
            kind: MessageType::Message,
            role: AssistantRole::Assistant,
            model: self.model.clone(),
            content,
            stop_reason: c.map(stop_reason),
            stop_sequence: c.and_then(|c| c.stop_sequence.clone()),
            usage,
        }
    }

    fn events(&mut self, block_events: Vec<BlockEvent>) -> Vec<Event> {
        block_events
            .into_iter()
            .map(|e| {
                let e = match e {
                    BlockEvent::Start(i) => {
                        self.ids.push(tool_use_id());
                        StreamEvent::ContentBlockStart {
                            index: i,
                            content_block: opening_block(&self.blocks.blocks[i], &self.ids[i]),
                        }
                    }
                    BlockEvent::Delta(i, text) => StreamEvent::ContentBlockDelta {
                        index: i,
                        delta: match self.blocks.blocks[i].kind {
                            BlockKind::Reasoning => BlockDelta::ThinkingDelta { thinking: text },
                            BlockKind::Text => BlockDelta::TextDelta { text },
                            BlockKind::Call { .. } => BlockDelta::InputJsonDelta { partial_json: text },
                        },
                    },
                    BlockEvent::Stop(i) => StreamEvent::ContentBlockStop { index: i },
                };
                named_event(e.name(), &e)
            })
            .collect()
    }
}

impl Encoder for MessagesEncoder {
    fn start(&mut self) -> Vec<Event> {
        let usage = MessageUsage {
            input_tokens: self.prompt_tokens,
            ..MessageUsage::default()
        };
        let e = StreamEvent::MessageStart {
            message: self.message(vec![], None, usage),
        };
        vec![named_event(e.name(), &e)]
    }

    fn update(&mut self, u: &Update, _: &Fold) -> Vec<Event> {
        let block_events = self.blocks.push(u);
        self.events(block_events)
    }

    fn finish(&mut self, fold: &Fold) -> Vec<Event> {
        let block_events = self.blocks.finish();
        let mut out = self.events(block_events);
        let c = &fold.choices()[0];
        for e in [
            StreamEvent::MessageDelta {
                delta: MessageDeltaBody {
                    stop_reason: Some(stop_reason(c)),
                    stop_sequence: c.stop_sequence.clone(),
                },
                usage: fold.usage().into(),
            },
            StreamEvent::MessageStop,
        ] {
            out.push(named_event(e.name(), &e));
        }
        out
    }

    fn fail(&mut self, e: EngineFailure, _: &Fold) -> Vec<Event> {
        vec![named_event("error", &ApiError::from(e).anthropic_body())]
    }

    fn body(mut self, fold: &Fold) -> Response {
        self.blocks.finish();
        let content = self
            .blocks
            .blocks
            .iter()
            .zip(&self.ids)
            .map(|(b, id)| content_block(b, id))
            .collect();
        Json(self.message(content, Some(&fold.choices()[0]), fold.usage().into())).into_response()
    }
}

#[utoipa::path(post, path = "/v1/messages", tag = "anthropic", request_body = MessagesRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The answer; with `stream: true`, Server-Sent Events named by their `type`: `message_start`, `content_block_start`, `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop` (`error` if the request fails).",
            content((Message = "application/json"), (StreamEvent = "text/event-stream"))),
        (status = "4XX", description = "Anthropic's error shape: a bad request (400), a wrong key (401), an unknown model (404), a body too large (413), a full queue (429).", body = AnthropicError),
        (status = "5XX", description = "The engine failed (500), or the server is loading or shutting down (503).", body = AnthropicError)))]
pub async fn messages(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<MessagesRequest>,
) -> Result<Response, ApiError> {
    let reasons = state.engine()?.reasoning.is_some();
    let conv = req.to_conversation(reasons)?;
    let run = prepare_chat(&state, &conv).await?.submit(&state)?;
    let encoder = MessagesEncoder {
        id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
        model: run.model,
        prompt_tokens: run.prompt_tokens,
        blocks: Blocks::default(),
        ids: Vec::new(),
    };
    respond(&state, run.events, run.fold, req.stream, "/v1/messages", encoder).await
}

#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic", request_body = CountTokensRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The prompt's tokens, as the chat template renders the conversation and tools.", body = TokenCount),
        (status = "4XX", description = "Anthropic's error shape.", body = AnthropicError),
        (status = 503, description = "Loading or shutting down.", body = AnthropicError)))]
pub async fn count_tokens(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CountTokensRequest>,
) -> Result<Json<TokenCount>, ApiError> {
    let conv = req.to_conversation()?;
    let prepared = prepare_chat(&state, &conv).await?;
    Ok(Json(TokenCount {
        input_tokens: prepared.prompt.len(),
    }))
}
