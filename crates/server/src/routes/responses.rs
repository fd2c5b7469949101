//! `POST /v1/responses`, `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}`,
//! `POST /v1/responses/compact`: OpenAI's Responses API. The input items (after the
//! stored conversation of `previous_response_id`) become a [`ApiConversation`]; the
//! answer's blocks ([`Blocks`]) become output items, streamed as the API's events or
//! returned whole ([`ResponsesEncoder`]).

use std::collections::{HashMap, HashSet};

use axum::extract::{Path, State};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moeserve_core::engine::{EngineFailure, FinishReason, SamplingParams};
use serde_json::{json, Value};

use super::chat::prepare_chat;
use super::{named_event, respond, Encoder, GenerationErrors};
use crate::api::conversation::{
    custom_arguments, custom_input, Call, Conversation as ApiConversation, InputDecoder, Message, Role,
    RESPONSES_FIELDS,
};
use crate::api::openai_responses::{
    read_input, CompactRequest, CompactResponse, DeletedResponse, IncompleteDetails, InputTokensDetails,
    ItemStatus, OutputItem, OutputText, OutputTokensDetails, ReasoningText, ResponseError, ResponseObject,
    ResponseStatus, ResponseStreamEvent, ResponseStreamEvent as Ev, ResponseUsage, ResponsesRequest,
};
use crate::api::openai_responses::{COMPACTION_PREFIX, COMPACTION_PROMPT};
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

/// Block `b` as an output item.
fn output_item(b: &Block, ids: &ItemIds, status: ItemStatus, custom: bool) -> OutputItem {
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
        BlockKind::Call { name } if custom => OutputItem::CustomToolCall {
            id: ids.id.clone(),
            call_id: ids.call_id.clone(),
            name: name.clone(),
            namespace: ids.namespace.clone(),
            input: custom_input(&b.text),
            status,
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
fn opening_item(b: &Block, ids: &ItemIds, custom: bool) -> OutputItem {
    let empty = Block {
        kind: b.kind.clone(),
        text: String::new(),
    };
    match output_item(&empty, ids, ItemStatus::InProgress, custom) {
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
        item => item,
    }
}

/// Whether the answer was cut off (by `max_output_tokens`, the context or the deadline).
fn cut_off(fold: &Fold) -> bool {
    fold.choices()[0].finish != Some(FinishReason::Stop)
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

/// A response: output items from the answer's blocks, streamed as the API's events
/// (numbered by `sequence_number`), stored at the end unless `store` is false.
struct ResponsesEncoder {
    state: SharedState,
    resp: ResponseObject,
    /// The stored turns before this one, and this turn's input (stored with the answer).
    history: Conversation,
    input: Vec<Message>,
    namespaces: HashMap<String, String>,
    custom: HashSet<String>,
    blocks: Blocks,
    ids: Vec<ItemIds>,
    /// Custom calls' input decoders, by output index.
    inputs: HashMap<usize, InputDecoder>,
    seq: u64,
}

impl ResponsesEncoder {
    fn event(&mut self, e: impl FnOnce(u64) -> Ev) -> Event {
        let e = e(self.seq);
        self.seq += 1;
        named_event(e.name(), &e)
    }

    fn is_custom(&self, b: &Block) -> bool {
        matches!(&b.kind, BlockKind::Call { name } if self.custom.contains(name))
    }

    /// The status of item `i` at its end: the last one of a cut-off answer is
    /// incomplete.
    fn status(&self, i: usize, fold: &Fold, ended: bool) -> ItemStatus {
        if ended && i + 1 == self.blocks.blocks.len() && cut_off(fold) {
            ItemStatus::Incomplete
        } else {
            ItemStatus::Completed
        }
    }

    /// The stream's events for `block_events`; `ended`: the answer is over.
    fn events(&mut self, block_events: Vec<BlockEvent>, fold: &Fold, ended: bool) -> Vec<Event> {
        let mut out = Vec::new();
        for e in block_events {
            match e {
                BlockEvent::Start(i) => {
                    let b = self.blocks.blocks[i].clone();
                    let custom = self.is_custom(&b);
                    let prefix = match b.kind {
                        BlockKind::Reasoning => "rs",
                        BlockKind::Text => "msg",
                        BlockKind::Call { .. } if custom => "ctc",
                        BlockKind::Call { .. } => "fc",
                    };
                    let namespace = match &b.kind {
                        BlockKind::Call { name } => self.namespaces.get(name).cloned(),
                        _ => None,
                    };
                    self.ids.push(ItemIds {
                        id: new_id(prefix),
                        call_id: new_id("call"),
                        namespace,
                    });
                    if custom {
                        self.inputs.insert(i, InputDecoder::default());
                    }
                    let item = opening_item(&b, &self.ids[i], custom);
                    out.push(self.event(|n| Ev::OutputItemAdded {
                        sequence_number: n,
                        output_index: i,
                        item,
                    }));
                    if b.kind == BlockKind::Text {
                        let item_id = self.ids[i].id.clone();
                        out.push(self.event(|n| Ev::ContentPartAdded {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            content_index: 0,
                            part: OutputText::new(String::new()),
                        }));
                    }
                }
                BlockEvent::Delta(i, delta) => {
                    let item_id = self.ids[i].id.clone();
                    let kind = self.blocks.blocks[i].kind.clone();
                    // A custom call streams its input's text, not the arguments around it.
                    let custom = self.inputs.get_mut(&i).map(|decoder| decoder.push(&delta));
                    if custom.as_ref().is_some_and(String::is_empty) {
                        continue;
                    }
                    out.push(self.event(|n| match (kind, custom) {
                        (BlockKind::Text, _) => Ev::OutputTextDelta {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            content_index: 0,
                            delta,
                            logprobs: vec![],
                        },
                        (BlockKind::Reasoning, _) => Ev::ReasoningTextDelta {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            content_index: 0,
                            delta,
                        },
                        (BlockKind::Call { .. }, Some(delta)) => Ev::CustomToolCallInputDelta {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            delta,
                        },
                        (BlockKind::Call { .. }, None) => Ev::FunctionCallArgumentsDelta {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            delta,
                        },
                    }));
                }
                BlockEvent::Stop(i) => {
                    let b = self.blocks.blocks[i].clone();
                    let custom = self.is_custom(&b);
                    let item_id = self.ids[i].id.clone();
                    match &b.kind {
                        BlockKind::Text => {
                            let text = b.text.clone();
                            let id = item_id.clone();
                            out.push(self.event(|n| Ev::OutputTextDone {
                                sequence_number: n,
                                item_id: id,
                                output_index: i,
                                content_index: 0,
                                text,
                                logprobs: vec![],
                            }));
                            out.push(self.event(|n| Ev::ContentPartDone {
                                sequence_number: n,
                                item_id,
                                output_index: i,
                                content_index: 0,
                                part: OutputText::new(b.text.clone()),
                            }));
                        }
                        BlockKind::Reasoning => out.push(self.event(|n| Ev::ReasoningTextDone {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            content_index: 0,
                            text: b.text.clone(),
                        })),
                        BlockKind::Call { .. } if custom => {
                            out.push(self.event(|n| Ev::CustomToolCallInputDone {
                                sequence_number: n,
                                item_id,
                                output_index: i,
                                input: custom_input(&b.text),
                            }))
                        }
                        BlockKind::Call { name } => out.push(self.event(|n| Ev::FunctionCallArgumentsDone {
                            sequence_number: n,
                            item_id,
                            output_index: i,
                            name: name.clone(),
                            arguments: b.text.clone(),
                        })),
                    }
                    let item = output_item(&b, &self.ids[i], self.status(i, fold, ended), custom);
                    out.push(self.event(|n| Ev::OutputItemDone {
                        sequence_number: n,
                        output_index: i,
                        item,
                    }));
                }
            }
        }
        out
    }

    /// The response at its end: output, text, status and usage; stored for a
    /// continuation unless `store` is false.
    fn finish_response(&mut self, fold: &Fold) {
        let blocks = self.blocks.blocks.clone();
        self.resp.output = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| output_item(b, &self.ids[i], self.status(i, fold, true), self.is_custom(b)))
            .collect();
        self.resp.output_text = blocks
            .iter()
            .filter(|b| b.kind == BlockKind::Text)
            .map(|b| b.text.as_str())
            .collect();
        if cut_off(fold) {
            self.resp.status = ResponseStatus::Incomplete;
            self.resp.incomplete_details = Some(IncompleteDetails {
                reason: "max_output_tokens".into(),
            });
        } else {
            self.resp.status = ResponseStatus::Completed;
        }
        self.resp.usage = Some(usage(fold));
        if self.resp.store {
            let turn = with_answer(std::mem::take(&mut self.input), &self.resp);
            self.state
                .responses
                .put(self.resp.clone(), self.history.then(turn));
        }
    }
}

/// This turn's messages with the response's answer added, as a continuation sees it: its
/// text and calls as one assistant message (the thought left out).
fn with_answer(mut turn: Vec<Message>, resp: &ResponseObject) -> Vec<Message> {
    let mut answer = Message::new(Role::Assistant, resp.output_text.clone());
    for item in &resp.output {
        match item {
            OutputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => answer.calls.push(Call {
                id: call_id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
            }),
            OutputItem::CustomToolCall {
                call_id, name, input, ..
            } => answer.calls.push(Call {
                id: call_id.clone(),
                name: name.clone(),
                arguments: custom_arguments(input),
            }),
            _ => {}
        }
    }
    turn.push(answer);
    turn
}

impl Encoder for ResponsesEncoder {
    fn start(&mut self) -> Vec<Event> {
        let (a, b) = (self.resp.clone(), self.resp.clone());
        vec![
            self.event(|n| Ev::Created {
                sequence_number: n,
                response: a,
            }),
            self.event(|n| Ev::InProgress {
                sequence_number: n,
                response: b,
            }),
        ]
    }

    fn update(&mut self, u: &Update, fold: &Fold) -> Vec<Event> {
        let block_events = self.blocks.push(u);
        self.events(block_events, fold, false)
    }

    fn finish(&mut self, fold: &Fold) -> Vec<Event> {
        let block_events = self.blocks.finish();
        let mut out = self.events(block_events, fold, true);
        self.finish_response(fold);
        let response = self.resp.clone();
        out.push(match self.resp.status {
            ResponseStatus::Incomplete => self.event(|n| Ev::Incomplete {
                sequence_number: n,
                response,
            }),
            _ => self.event(|n| Ev::Completed {
                sequence_number: n,
                response,
            }),
        });
        out
    }

    fn fail(&mut self, e: EngineFailure, _: &Fold) -> Vec<Event> {
        let parts = ApiError::from(e).response();
        self.resp.status = ResponseStatus::Failed;
        self.resp.error = Some(ResponseError {
            code: parts.error.code.unwrap_or_else(|| "server_error".into()),
            message: parts.error.message,
        });
        let response = self.resp.clone();
        vec![self.event(|n| Ev::Failed {
            sequence_number: n,
            response,
        })]
    }

    fn body(mut self, fold: &Fold) -> Response {
        self.blocks.finish();
        self.finish_response(fold);
        Json(self.resp).into_response()
    }
}

#[utoipa::path(post, path = "/v1/responses", tag = "responses", request_body = ResponsesRequest,
    security(("api_key" = [])), responses(
        (status = 200, description = "The response; with `stream: true`, Server-Sent Events named by their `type` (`response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`, .. `.done`, `response.function_call_arguments.delta` / `.done`, `response.custom_tool_call_input.delta` / `.done`, `response.output_item.done`, then `response.completed`, `response.incomplete` or `response.failed`), numbered by `sequence_number`.",
            content((ResponseObject = "application/json"), (ResponseStreamEvent = "text/event-stream"))),
        GenerationErrors))]
pub async fn create(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    req.check()?;
    let history = stored_conversation(&state, req.previous_response_id.as_deref())?;
    let input = read_input(req.input.as_ref().expect("checked"))?;
    let namespaces = req.function_namespaces(&input);
    let turn = input.messages.clone();
    let conv = req.to_conversation(history.messages(), input)?;
    let run = prepare_chat(&state, &conv).await?.submit(&state)?;
    let encoder = ResponsesEncoder {
        state: state.clone(),
        resp: ResponseObject::start(new_id("resp"), run.model, &req),
        history,
        input: turn,
        namespaces,
        custom: conv.custom_names(),
        blocks: Blocks::default(),
        ids: Vec::new(),
        inputs: HashMap::new(),
        seq: 0,
    };
    respond(&state, run.events, run.fold, req.stream, "/v1/responses", encoder).await
}

/// The longest summary a compaction writes.
const COMPACTION_MAX_TOKENS: usize = 2048;

/// A compaction's answer: the user's messages, then the summary the model wrote.
struct CompactEncoder {
    output: Vec<Value>,
    blocks: Blocks,
}

impl Encoder for CompactEncoder {
    // Compaction is not streamed.
    fn start(&mut self) -> Vec<Event> {
        vec![]
    }

    fn update(&mut self, u: &Update, _: &Fold) -> Vec<Event> {
        self.blocks.push(u);
        vec![]
    }

    fn finish(&mut self, _: &Fold) -> Vec<Event> {
        vec![]
    }

    fn fail(&mut self, _: EngineFailure, _: &Fold) -> Vec<Event> {
        vec![]
    }

    fn body(mut self, fold: &Fold) -> Response {
        self.blocks.finish();
        let summary: String = self
            .blocks
            .blocks
            .iter()
            .filter(|b| b.kind == BlockKind::Text)
            .map(|b| b.text.as_str())
            .collect();
        self.output.push(json!({"type": "compaction", "id": new_id("cmp"),
            "encrypted_content": format!("{COMPACTION_PREFIX}{}", summary.trim())}));
        Json(CompactResponse {
            id: new_id("resp"),
            object: "response.compaction".into(),
            created_at: crate::api::unix_now(),
            output: self.output,
            usage: usage(fold),
        })
        .into_response()
    }
}

#[utoipa::path(post, path = "/v1/responses/compact", tag = "responses", operation_id = "compact_response",
    request_body = CompactRequest, security(("api_key" = [])), responses(
        (status = 200, description = "The compacted conversation: the user's messages, then a `compaction` item with the model's summary of the rest; send `output` back as the start of the next `input`.", body = CompactResponse),
        GenerationErrors))]
pub async fn compact(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<CompactRequest>,
) -> Result<Response, ApiError> {
    let history = stored_conversation(&state, req.previous_response_id.as_deref())?;
    let mut conversation = history.messages();
    if let Some(input) = req.input.as_ref().filter(|i| !i.is_null()) {
        conversation.extend(read_input(input)?.messages);
    }
    if conversation.is_empty() {
        return Err(ApiError::invalid_param(
            "input",
            "there is no conversation to compact",
        ));
    }
    // The user's own words are kept as they were (as OpenAI's compaction does); the
    // rest (answers, calls, their results) is what the summary stands for.
    let output: Vec<Value> = conversation
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": m.content}]}))
        .collect();
    let mut messages = Vec::with_capacity(conversation.len() + 2);
    if let Some(i) = &req.instructions {
        messages.push(Message::new(Role::System, i.clone()));
    }
    messages.extend(conversation);
    messages.push(Message::new(Role::User, COMPACTION_PROMPT));
    let conv = ApiConversation {
        model: req.model.clone(),
        messages,
        tools: None,
        params: SamplingParams {
            max_tokens: Some(COMPACTION_MAX_TOKENS),
            ..SamplingParams::default()
        },
        temperature_set: false,
        format: None,
        max_reasoning_tokens: None,
        reasoning_field: "reasoning",
        clamp_max_tokens: true,
        fields: &RESPONSES_FIELDS,
    };
    let run = prepare_chat(&state, &conv).await?.submit(&state)?;
    let encoder = CompactEncoder {
        output,
        blocks: Blocks::default(),
    };
    respond(
        &state,
        run.events,
        run.fold,
        false,
        "/v1/responses/compact",
        encoder,
    )
    .await
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
