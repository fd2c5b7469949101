//! `POST /v1/responses`, `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`: OpenAI's
//! Responses API over the chat path. The input items (after the stored conversation of
//! `previous_response_id`) become a chat request; the answer's blocks ([`Blocks`])
//! become output items, streamed as the API's events or returned whole.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use moeserve_core::engine::FinishReason;
use serde_json::{json, Value};

use super::chat::{prepare_chat, ChatRun};
use super::{run_to_end, sse_named_response, to_json, GenerationErrors, Timing};
use crate::api::openai_responses::{
    input_messages, CompactRequest, CompactResponse, DeletedResponse, IncompleteDetails, InputTokensDetails,
    ItemStatus, OutputItem, OutputText, OutputTokensDetails, ReasoningText, ResponseError, ResponseObject,
    ResponseStatus, ResponseStreamEvent, ResponseStreamEvent as Ev, ResponseUsage, ResponsesRequest,
};
use crate::api::openai_responses::{COMPACTION_PREFIX, COMPACTION_PROMPT};
use crate::api::requests::ChatCompletionRequest;
use crate::api::responses::ErrorResponse;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::generation::{Block, BlockEvent, BlockKind, Blocks, Fold, Update};
use crate::state::SharedState;
use crate::store::Conversation;

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// An output item's ids: its own, and a call's `call_id` (and the namespace of the
/// function it calls, when offered in one).
struct ItemIds {
    id: String,
    call_id: String,
    namespace: Option<String>,
}

impl ItemIds {
    fn new(kind: &BlockKind, namespaces: &HashMap<String, String>) -> Self {
        let prefix = match kind {
            BlockKind::Reasoning => "rs",
            BlockKind::Text => "msg",
            BlockKind::Call { .. } => "fc",
        };
        let namespace = match kind {
            BlockKind::Call { name } => namespaces.get(name).cloned(),
            _ => None,
        };
        ItemIds {
            id: new_id(prefix),
            call_id: new_id("call"),
            namespace,
        }
    }
}

/// Block `b` as an output item.
fn output_item(b: &Block, ids: &ItemIds, status: ItemStatus) -> OutputItem {
    match &b.kind {
        BlockKind::Reasoning => OutputItem::Reasoning {
            id: ids.id.clone(),
            summary: vec![],
            content: vec![ReasoningText {
                kind: "reasoning_text".into(),
                text: b.text.clone(),
            }],
            status,
        },
        BlockKind::Text => OutputItem::Message {
            id: ids.id.clone(),
            status,
            role: "assistant".into(),
            content: vec![OutputText::new(b.text.clone())],
        },
        BlockKind::Call { name } => OutputItem::FunctionCall {
            id: ids.id.clone(),
            call_id: ids.call_id.clone(),
            name: name.clone(),
            namespace: ids.namespace.clone(),
            arguments: b.text.clone(),
            status,
        },
    }
}

/// An item as it opens in a stream: no content yet.
fn opening_item(b: &Block, ids: &ItemIds) -> OutputItem {
    match output_item(b, ids, ItemStatus::InProgress) {
        OutputItem::Reasoning {
            id, summary, status, ..
        } => OutputItem::Reasoning {
            id,
            summary,
            content: vec![],
            status,
        },
        OutputItem::Message { id, status, role, .. } => OutputItem::Message {
            id,
            status,
            role,
            content: vec![],
        },
        OutputItem::FunctionCall {
            id,
            call_id,
            name,
            namespace,
            status,
            ..
        } => OutputItem::FunctionCall {
            id,
            call_id,
            name,
            namespace,
            arguments: String::new(),
            status,
        },
    }
}

/// Whether the answer was cut off (by `max_output_tokens`, the context or the deadline).
fn cut_off(fold: &Fold) -> bool {
    fold.choices()[0].finish != Some(FinishReason::Stop)
}

/// The status of item `i` of `n` at its end: the last one of a cut-off answer is
/// incomplete.
fn item_status(i: usize, n: usize, fold: &Fold, ended: bool) -> ItemStatus {
    if ended && i + 1 == n && cut_off(fold) {
        ItemStatus::Incomplete
    } else {
        ItemStatus::Completed
    }
}

/// The response at its end: output, text, status and usage.
fn finish(resp: &mut ResponseObject, blocks: &Blocks, ids: &[ItemIds], fold: &Fold) {
    let n = blocks.blocks.len();
    resp.output = blocks
        .blocks
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (b, ids))| output_item(b, ids, item_status(i, n, fold, true)))
        .collect();
    resp.output_text = blocks
        .blocks
        .iter()
        .filter(|b| b.kind == BlockKind::Text)
        .map(|b| b.text.as_str())
        .collect();
    if cut_off(fold) {
        resp.status = ResponseStatus::Incomplete;
        resp.incomplete_details = Some(IncompleteDetails {
            reason: "max_output_tokens".into(),
        });
    } else {
        resp.status = ResponseStatus::Completed;
    }
    resp.usage = Some(usage(fold));
}

/// The token counts of an answer, in the Responses API's terms.
fn usage(fold: &Fold) -> ResponseUsage {
    let u = fold.usage();
    ResponseUsage {
        input_tokens: u.prompt_tokens,
        input_tokens_details: InputTokensDetails {
            cached_tokens: u.cached_tokens,
        },
        output_tokens: u.completion_tokens,
        output_tokens_details: OutputTokensDetails {
            reasoning_tokens: fold.choices()[0].reasoning_tokens,
        },
        total_tokens: u.prompt_tokens + u.completion_tokens,
    }
}

/// The stored conversation `previous_response_id` continues (none: an empty one).
fn stored_conversation(state: &SharedState, previous: Option<&str>) -> Result<Conversation, ApiError> {
    match previous {
        Some(id) => Ok(state
            .responses
            .get(id)
            .ok_or_else(|| not_found(id, Some("previous_response_id")))?
            .conversation),
        None => Ok(Conversation::default()),
    }
}

/// This turn's messages (`input`) with the response's answer added, as a continuation
/// sees it: its text and calls as one assistant message (the thought left out).
fn with_answer(mut conversation: Vec<Value>, resp: &ResponseObject) -> Vec<Value> {
    let mut calls = Vec::new();
    for item in &resp.output {
        if let OutputItem::FunctionCall {
            call_id,
            name,
            arguments,
            ..
        } = item
        {
            calls.push(json!({"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}));
        }
    }
    let mut msg = json!({"role": "assistant", "content": resp.output_text});
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    conversation.push(msg);
    conversation
}

fn not_found(id: &str, param: Option<&str>) -> ApiError {
    ApiError::NotFound {
        message: match param {
            Some(_) => format!("Previous response with id '{id}' not found."),
            None => format!("No response found with id '{id}'."),
        },
        param: param.map(String::from),
        code: if param.is_some() {
            "previous_response_not_found"
        } else {
            "response_not_found"
        },
    }
}

#[utoipa::path(post, path = "/v1/responses", tag = "responses", request_body = ResponsesRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The response; with `stream: true`, Server-Sent Events named by their `type` (`response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`, .. `.done`, `response.function_call_arguments.delta` / `.done`, `response.output_item.done`, then `response.completed`, `response.incomplete` or `response.failed`), numbered by `sequence_number`.",
            content((ResponseObject = "application/json"), (ResponseStreamEvent = "text/event-stream"))),
        GenerationErrors))]
pub async fn create(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    req.check()?;
    let history = stored_conversation(&state, req.previous_response_id.as_deref())?;
    let input = input_messages(req.input.as_ref().expect("checked"))?;
    let mut conversation = history.messages();
    conversation.extend(input.iter().cloned());
    let chat = req.to_chat(&conversation)?;
    let ChatRun {
        model,
        mut fold,
        events,
        ..
    } = prepare_chat(&state, &chat).await?.submit(&state, "input")?;
    let mut resp = ResponseObject::start(new_id("resp"), model, &req);
    let namespaces = req.function_namespaces();
    let mut timing = Timing::new("/v1/responses");
    let mut blocks = Blocks::default();

    if !req.stream {
        run_to_end(&state, events, &mut fold, &mut timing, |u| {
            blocks.push(u);
        })
        .await?;
        blocks.finish();
        let ids: Vec<ItemIds> = blocks
            .blocks
            .iter()
            .map(|b| ItemIds::new(&b.kind, &namespaces))
            .collect();
        finish(&mut resp, &blocks, &ids, &fold);
        if resp.store {
            state
                .responses
                .put(resp.clone(), history.then(with_answer(input, &resp)));
        }
        return Ok(Json(resp).into_response());
    }

    let keepalive = state.settings.sse_keepalive_secs;
    let stream = async_stream::stream! {
        let mut events = events;
        let mut seq = 0u64;
        let mut next = move || { seq += 1; seq - 1 };
        let named = |e: Ev| (e.name(), to_json(&e));
        yield named(Ev::Created { sequence_number: next(), response: resp.clone() });
        yield named(Ev::InProgress { sequence_number: next(), response: resp.clone() });
        let mut ids: Vec<ItemIds> = Vec::new();
        let mut failed = None;
        let mut ended = false;
        loop {
            let updates: Vec<Update> = match events.next().await {
                Some(event) => fold.apply(event),
                None => { ended = true; fold.close() }
            };
            let mut block_events = Vec::new();
            for u in &updates {
                timing.observe(&state, u);
                if let Update::Failed(e) = u {
                    failed = Some(e.clone());
                }
                block_events.extend(blocks.push(u));
            }
            if failed.is_some() {
                break;
            }
            if ended {
                block_events.extend(blocks.finish());
            }
            for e in block_events {
                match e {
                    BlockEvent::Start(i) => {
                        let b = &blocks.blocks[i];
                        ids.push(ItemIds::new(&b.kind, &namespaces));
                        yield named(Ev::OutputItemAdded { sequence_number: next(), output_index: i, item: opening_item(b, &ids[i]) });
                        if b.kind == BlockKind::Text {
                            yield named(Ev::ContentPartAdded { sequence_number: next(), item_id: ids[i].id.clone(), output_index: i, content_index: 0, part: OutputText::new(String::new()) });
                        }
                    }
                    BlockEvent::Delta(i, delta) => {
                        let item_id = ids[i].id.clone();
                        yield named(match blocks.blocks[i].kind {
                            BlockKind::Text => Ev::OutputTextDelta { sequence_number: next(), item_id, output_index: i, content_index: 0, delta, logprobs: vec![] },
                            BlockKind::Reasoning => Ev::ReasoningTextDelta { sequence_number: next(), item_id, output_index: i, content_index: 0, delta },
                            BlockKind::Call { .. } => Ev::FunctionCallArgumentsDelta { sequence_number: next(), item_id, output_index: i, delta },
                        });
                    }
                    BlockEvent::Stop(i) => {
                        let b = &blocks.blocks[i];
                        let item_id = ids[i].id.clone();
                        match &b.kind {
                            BlockKind::Text => {
                                yield named(Ev::OutputTextDone { sequence_number: next(), item_id: item_id.clone(), output_index: i, content_index: 0, text: b.text.clone(), logprobs: vec![] });
                                yield named(Ev::ContentPartDone { sequence_number: next(), item_id, output_index: i, content_index: 0, part: OutputText::new(b.text.clone()) });
                            }
                            BlockKind::Reasoning => {
                                yield named(Ev::ReasoningTextDone { sequence_number: next(), item_id, output_index: i, content_index: 0, text: b.text.clone() });
                            }
                            BlockKind::Call { name } => {
                                yield named(Ev::FunctionCallArgumentsDone { sequence_number: next(), item_id, output_index: i, name: name.clone(), arguments: b.text.clone() });
                            }
                        }
                        let status = item_status(i, blocks.blocks.len(), &fold, ended);
                        yield named(Ev::OutputItemDone { sequence_number: next(), output_index: i, item: output_item(b, &ids[i], status) });
                    }
                }
            }
            if ended {
                // The events are over: polling them again would panic (the deadline's
                // merged stream is an `unfold`).
                break;
            }
        }
        timing.done(&state);
        if let Some(e) = failed {
            let parts = ApiError::from(e).response();
            resp.status = ResponseStatus::Failed;
            resp.error = Some(ResponseError {
                code: parts.error.code.unwrap_or_else(|| "server_error".into()),
                message: parts.error.message,
            });
            yield named(Ev::Failed { sequence_number: next(), response: resp });
            return;
        }
        finish(&mut resp, &blocks, &ids, &fold);
        if resp.store {
            state.responses.put(resp.clone(), history.then(with_answer(input, &resp)));
        }
        let sequence_number = next();
        yield named(match resp.status {
            ResponseStatus::Incomplete => Ev::Incomplete { sequence_number, response: resp },
            _ => Ev::Completed { sequence_number, response: resp },
        });
    };
    Ok(sse_named_response(stream, keepalive))
}

/// The longest summary a compaction writes.
const COMPACTION_MAX_TOKENS: usize = 2048;

#[utoipa::path(post, path = "/v1/responses/compact", tag = "responses", operation_id = "compact_response",
    request_body = CompactRequest, security(("api_key" = [])), responses(
        (status = 200, description = "The compacted conversation: the user's messages, then a `compaction` item with the model's summary of the rest; send `output` back as the start of the next `input`.", body = CompactResponse),
        GenerationErrors))]
pub async fn compact(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CompactRequest>,
) -> Result<Json<CompactResponse>, ApiError> {
    let history = stored_conversation(&state, req.previous_response_id.as_deref())?;
    let mut conversation = history.messages();
    if let Some(input) = req.input.as_ref().filter(|i| !i.is_null()) {
        conversation.extend(input_messages(input)?);
    }
    if conversation.is_empty() {
        return Err(ApiError::invalid_param(
            "input",
            "there is no conversation to compact",
        ));
    }
    // The user's own words are kept as they were (as OpenAI's compaction does); the
    // rest (answers, calls, their results) is what the summary stands for.
    let mut output: Vec<Value> = conversation
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": m["content"]}]}))
        .collect();
    let mut messages = Vec::with_capacity(conversation.len() + 2);
    if let Some(i) = &req.instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    messages.extend(conversation);
    messages.push(json!({"role": "user", "content": COMPACTION_PROMPT}));
    let mut chat: ChatCompletionRequest = serde_json::from_value(json!({
        "model": req.model, "messages": messages, "max_tokens": COMPACTION_MAX_TOKENS,
    }))
    .map_err(|e| ApiError::invalid(format!("invalid request: {e}"), None))?;
    chat.clamp_max_tokens = true;
    let ChatRun { mut fold, events, .. } = prepare_chat(&state, &chat).await?.submit(&state, "input")?;
    let mut timing = Timing::new("/v1/responses/compact");
    let mut blocks = Blocks::default();
    run_to_end(&state, events, &mut fold, &mut timing, |u| {
        blocks.push(u);
    })
    .await?;
    blocks.finish();
    let summary: String = blocks
        .blocks
        .iter()
        .filter(|b| b.kind == BlockKind::Text)
        .map(|b| b.text.as_str())
        .collect();
    output.push(json!({"type": "compaction", "id": new_id("cmp"),
        "encrypted_content": format!("{COMPACTION_PREFIX}{}", summary.trim())}));
    Ok(Json(CompactResponse {
        id: new_id("resp"),
        object: "response.compaction".into(),
        created_at: crate::api::unix_now(),
        output,
        usage: usage(&fold),
    }))
}

#[utoipa::path(get, path = "/v1/responses/{id}", tag = "responses", operation_id = "retrieve_response",
    params(("id" = String, Path, description = "The response's id.")),
    security(("api_key" = [])), responses(
        (status = 200, description = "The stored response.", body = ResponseObject),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
        (status = 404, description = "Not stored: unknown, expired, deleted or made with `store: false`.", body = ErrorResponse)))]
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<ResponseObject>, ApiError> {
    let stored = state.responses.get(&id).ok_or_else(|| not_found(&id, None))?;
    Ok(Json(stored.response))
}

#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "responses", operation_id = "delete_response",
    params(("id" = String, Path, description = "The response's id.")),
    security(("api_key" = [])), responses(
        (status = 200, description = "Deleted.", body = DeletedResponse),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
        (status = 404, description = "Not stored.", body = ErrorResponse)))]
pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<DeletedResponse>, ApiError> {
    if !state.responses.delete(&id) {
        return Err(not_found(&id, None));
    }
    Ok(Json(DeletedResponse {
        id,
        object: "response.deleted".into(),
        deleted: true,
    }))
}
