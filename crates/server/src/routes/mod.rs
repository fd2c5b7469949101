//! One module per endpoint, and what the generation endpoints share: running a request
//! to its end, latency metrics, token texts, the SSE response.

pub mod chat;
pub mod completions;
pub mod health;
pub mod messages;
pub mod models;
pub mod openapi;
pub mod responses;
pub mod tokenize;
pub mod web;

use std::time::{Duration, Instant};

use axum::response::sse::Event;
use futures::stream::{Stream, StreamExt};
use moeserve_core::engine::EngineFailure;
use moeserve_core::TextCodec;

use crate::api::responses::{ErrorResponse, Meta, UsageSlot};
use crate::error::ApiError;
use crate::generation::{Events, Fold, Update};
use crate::state::{AppState, SharedState};

/// The errors a generation route answers with, as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its derived description is used
pub enum GenerationErrors {
    /// Malformed JSON, a wrong type, a value out of range, a prompt too long for the
    /// context (`context_length_exceeded`).
    #[response(status = 400)]
    BadRequest(ErrorResponse),
    /// A missing or wrong API key.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// An unknown model.
    #[response(status = 404)]
    NotFound(ErrorResponse),
    /// A body over `max_body_bytes`.
    #[response(status = 413)]
    TooLarge(ErrorResponse),
    /// Not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorResponse),
    /// `max_waiting_requests` are waiting; `Retry-After` says when to retry.
    #[response(status = 429)]
    QueueFull(ErrorResponse),
    /// The engine failed the request.
    #[response(status = 500)]
    Internal(ErrorResponse),
    /// The model is loading, or the server is shutting down.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// A generation response's shared fields, and whether its stream ends with a usage
/// chunk.
pub struct ResponseMeta {
    pub meta: Meta,
    pub include_usage: bool,
}

impl ResponseMeta {
    pub fn new(prefix: &str, model: &str, include_usage: bool) -> Self {
        Self {
            meta: Meta {
                id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
                created: crate::api::unix_now(),
                model: model.to_string(),
            },
            include_usage,
        }
    }

    /// The `usage` of a chunk that is not the last: `null` when the stream ends with
    /// usage, else absent.
    pub fn no_usage(&self) -> UsageSlot {
        if self.include_usage {
            UsageSlot::Null
        } else {
            UsageSlot::Absent
        }
    }
}

/// Latency bookkeeping for the metrics.
pub struct Timing {
    endpoint: &'static str,
    start: Instant,
    last_token: Option<Instant>,
}

impl Timing {
    pub fn new(endpoint: &'static str) -> Self {
        Self {
            endpoint,
            start: Instant::now(),
            last_token: None,
        }
    }

    /// Records the update's tokens: the first one's time to first token, the others'
    /// inter-token latency.
    pub fn observe(&mut self, state: &AppState, update: &Update) {
        if !matches!(update, Update::Delta { tokens, .. } if *tokens > 0) {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => state
                .metrics
                .ttft
                .with_label_values(&[self.endpoint])
                .observe((now - self.start).as_secs_f64()),
            Some(t) => state
                .metrics
                .inter_token
                .with_label_values(&[self.endpoint])
                .observe((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    pub fn done(&self, state: &AppState) {
        state
            .metrics
            .e2e
            .with_label_values(&[self.endpoint])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// What one API makes of a request's [`Update`]s: its stream's events and its
/// non-streamed body. [`respond`] drives every generation API's request through the same
/// loop (the fold, the deadline, the metrics, failure), so they behave alike; an encoder
/// only says how its API spells the answer. `update` sees every update in both modes (a
/// non-streamed answer drops the events), so an encoder that builds state as it goes
/// (blocks, ids) builds the same for both.
pub trait Encoder: Send + 'static {
    /// The events that open a stream.
    fn start(&mut self) -> Vec<Event>;
    /// The events of one update.
    fn update(&mut self, u: &Update, fold: &Fold) -> Vec<Event>;
    /// The events that end a stream whose answer ended (after the updates that closed
    /// it).
    fn finish(&mut self, fold: &Fold) -> Vec<Event>;
    /// The events that end a stream the engine failed.
    fn fail(&mut self, e: EngineFailure, fold: &Fold) -> Vec<Event>;
    /// The non-streamed answer.
    fn body(self, fold: &Fold) -> axum::response::Response;
}

/// Runs a submitted request to its end: streamed as `encoder`'s events (an SSE response,
/// keep-alive comments while nothing is sent), or its body once the answer is whole. A
/// failure before a stream starts, or of a non-streamed request, is the request's error.
pub async fn respond<E: Encoder>(
    state: &SharedState,
    events: Events,
    mut fold: Fold,
    stream: bool,
    endpoint: &'static str,
    mut encoder: E,
) -> Result<axum::response::Response, ApiError> {
    let mut timing = Timing::new(endpoint);
    let mut events = events;
    if !stream {
        while let Some(event) = events.next().await {
            for u in fold.apply(event) {
                timing.observe(state, &u);
                if let Update::Failed(e) = u {
                    return Err(e.into());
                }
                encoder.update(&u, &fold);
            }
        }
        for u in fold.close() {
            encoder.update(&u, &fold);
        }
        timing.done(state);
        return Ok(encoder.body(&fold));
    }
    let state = state.clone();
    let keepalive = state.settings.sse_keepalive_secs;
    let stream = async_stream::stream! {
        for e in encoder.start() {
            yield e;
        }
        let mut failed = None;
        // The stream ends with its last event (polling it again would panic: the
        // deadline's merged stream is an `unfold`).
        'events: while let Some(event) = events.next().await {
            for u in fold.apply(event) {
                timing.observe(&state, &u);
                if let Update::Failed(e) = u {
                    failed = Some(e);
                    break 'events;
                }
                for e in encoder.update(&u, &fold) {
                    yield e;
                }
            }
        }
        match failed {
            Some(e) => {
                timing.done(&state);
                for e in encoder.fail(e, &fold) {
                    yield e;
                }
            }
            None => {
                for u in fold.close() {
                    for e in encoder.update(&u, &fold) {
                        yield e;
                    }
                }
                timing.done(&state);
                for e in encoder.finish(&fold) {
                    yield e;
                }
            }
        }
    };
    Ok(sse(stream, keepalive))
}

/// An SSE event carrying `data` as JSON.
pub fn data_event<T: serde::Serialize>(data: &T) -> Event {
    Event::default().data(serde_json::to_string(data).expect("response types serialize"))
}

/// A named SSE event (`event: <name>`), as the Responses and Messages APIs stream.
pub fn named_event<T: serde::Serialize>(name: &str, data: &T) -> Event {
    data_event(data).event(name)
}

/// The end of an OpenAI chat or completions stream: the usage chunk when the client
/// asked for it, then `[DONE]`.
pub fn openai_stream_end<T: serde::Serialize>(usage_chunk: Option<T>) -> Vec<Event> {
    let mut out: Vec<Event> = usage_chunk.iter().map(data_event).collect();
    out.push(Event::default().data("[DONE]"));
    out
}

/// A failed OpenAI chat or completions stream: the error as a chunk, then `[DONE]`.
pub fn openai_stream_failure(e: EngineFailure) -> Vec<Event> {
    vec![
        data_event(&ApiError::from(e).body()),
        Event::default().data("[DONE]"),
    ]
}

/// The text of one token, for logprobs (partial characters come out as U+FFFD).
pub fn token_text(codec: &TextCodec, id: u32) -> String {
    codec.decode(&[id], false).unwrap_or_default()
}

/// Tokenizes off the async runtime's workers.
pub async fn encode(codec: std::sync::Arc<TextCodec>, text: String) -> Result<Vec<u32>, ApiError> {
    tokio::task::spawn_blocking(move || codec.encode(&text))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), None))
}

fn sse<S>(events: S, keepalive_secs: u64) -> axum::response::Response
where
    S: Stream<Item = Event> + Send + 'static,
{
    use axum::response::sse::{KeepAlive, Sse};
    use axum::response::IntoResponse;
    Sse::new(events.map(Ok::<_, std::convert::Infallible>))
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(keepalive_secs))
                .text("keep-alive"),
        )
        .into_response()
}

/// `stream_options.include_usage`
pub fn include_usage(o: &Option<crate::api::requests::StreamOptions>) -> bool {
    o.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
}

/// Compiles a request's structured-output constraint (off the async threads: a large
/// schema takes milliseconds); a constraint that does not compile is a 400 naming the
/// parameter it came from.
pub async fn compile_constraint(
    state: &crate::state::SharedState,
    spec: Option<(moeserve_core::grammar::ConstraintSpec, &'static str)>,
) -> Result<Option<std::sync::Arc<moeserve_core::grammar::Constraint>>, ApiError> {
    let Some((spec, param)) = spec else {
        return Ok(None);
    };
    let state = state.clone();
    let compiled = tokio::task::spawn_blocking(move || {
        let m = state.engine()?;
        let grammars = m.grammars.as_ref().ok_or_else(|| {
            ApiError::invalid_param(
                param,
                "this model's vocabulary does not support constrained outputs",
            )
        })?;
        grammars
            .compile(&spec)
            .map_err(|e| ApiError::invalid_param(param, format!("the constraint does not compile: {e}")))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("compiling the constraint: {e}")))??;
    Ok(Some(std::sync::Arc::new(compiled)))
}
