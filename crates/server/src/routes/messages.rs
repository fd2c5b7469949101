//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API
//! over the chat path (the request is translated into a chat request; the answer's
//! blocks come from [`Blocks`]). Errors on these routes are in Anthropic's shape
//! (`middleware::anthropic_errors`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use moeserve_core::engine::FinishReason;
use serde_json::{json, Value};

use super::chat::{prepare_chat, ChatRun};
use super::{run_to_end, sse_named_response, to_json, Timing};
use crate::api::anthropic::{
    AnthropicError, AssistantRole, BlockDelta, ContentBlock, CountTokensRequest, Message, MessageDeltaBody,
    MessageType, MessageUsage, MessagesRequest, StopReason, StreamEvent, TokenCount,
};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{Block, BlockEvent, BlockKind, Blocks, Choice};
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
    let chat = req.to_chat(reasons)?;
    let ChatRun {
        model,
        mut fold,
        events,
        prompt_tokens,
        ..
    } = prepare_chat(&state, &chat).await?.submit(&state, "messages")?;
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let mut timing = Timing::new("/v1/messages");
    let mut blocks = Blocks::default();
    let message = move |content: Vec<ContentBlock>, c: Option<&Choice>, usage: MessageUsage| Message {
        id: id.clone(),
        kind: MessageType::Message,
        role: AssistantRole::Assistant,
        model: model.clone(),
        content,
        stop_reason: c.map(stop_reason),
        stop_sequence: c.and_then(|c| c.stop_sequence.clone()),
        usage,
    };

    if !req.stream {
        run_to_end(&state, events, &mut fold, &mut timing, |u| {
            blocks.push(u);
        })
        .await?;
        blocks.finish();
        let content = blocks
            .blocks
            .iter()
            .map(|b| content_block(b, &tool_use_id()))
            .collect();
        let c = &fold.choices()[0];
        return Ok(Json(message(content, Some(c), fold.usage().into())).into_response());
    }

    let keepalive = state.settings.sse_keepalive_secs;
    let stream = async_stream::stream! {
        let mut events = events;
        let start = MessageUsage { input_tokens: prompt_tokens, ..MessageUsage::default() };
        let ev = |e: StreamEvent| (e.name(), to_json(&e));
        yield ev(StreamEvent::MessageStart { message: message(vec![], None, start) });
        let mut ids: Vec<String> = Vec::new();
        let mut block_events = |updates: &[crate::generation::Update], blocks: &mut Blocks, end: bool| {
            let mut out: Vec<BlockEvent> = updates.iter().flat_map(|u| blocks.push(u)).collect();
            if end {
                out.extend(blocks.finish());
            }
            out.into_iter()
                .map(|e| match e {
                    BlockEvent::Start(i) => {
                        ids.push(tool_use_id());
                        StreamEvent::ContentBlockStart { index: i, content_block: opening_block(&blocks.blocks[i], &ids[i]) }
                    }
                    BlockEvent::Delta(i, text) => StreamEvent::ContentBlockDelta {
                        index: i,
                        delta: match blocks.blocks[i].kind {
                            BlockKind::Reasoning => BlockDelta::ThinkingDelta { thinking: text },
                            BlockKind::Text => BlockDelta::TextDelta { text },
                            BlockKind::Call { .. } => BlockDelta::InputJsonDelta { partial_json: text },
                        },
                    },
                    BlockEvent::Stop(i) => StreamEvent::ContentBlockStop { index: i },
                })
                .collect::<Vec<_>>()
        };
        while let Some(event) = events.next().await {
            let updates = fold.apply(event);
            for u in &updates {
                timing.observe(&state, u);
                if let crate::generation::Update::Failed(e) = u {
                    yield ("error", ApiError::from(e.clone()).anthropic_body());
                    timing.done(&state);
                    return;
                }
            }
            for e in block_events(&updates, &mut blocks, false) {
                yield ev(e);
            }
        }
        let closing = fold.close();
        for e in block_events(&closing, &mut blocks, true) {
            yield ev(e);
        }
        timing.done(&state);
        let c = &fold.choices()[0];
        yield ev(StreamEvent::MessageDelta {
            delta: MessageDeltaBody { stop_reason: Some(stop_reason(c)), stop_sequence: c.stop_sequence.clone() },
            usage: fold.usage().into(),
        });
        yield ev(StreamEvent::MessageStop);
    };
    Ok(sse_named_response(stream, keepalive))
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
    let chat = req.to_chat()?;
    let prepared = prepare_chat(&state, &chat).await?;
    Ok(Json(TokenCount {
        input_tokens: prepared.prompt.len(),
    }))
}
