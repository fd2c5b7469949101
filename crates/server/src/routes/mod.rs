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

use futures::stream::{self, Stream, StreamExt};
use moeserve_core::TextCodec;

use crate::api::responses::{ErrorResponse, Meta, UsageSlot};
use crate::error::ApiError;
use crate::generation::{Events, Fold, Update};
use crate::state::AppState;

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

/// Runs a request to its end (the non-streamed responses): every event into `fold`,
/// then the choices still open closed; `each` sees every update. An engine failure is
/// the request's error.
pub async fn run_to_end(
    state: &AppState,
    mut events: Events,
    fold: &mut Fold,
    timing: &mut Timing,
    mut each: impl FnMut(&Update),
) -> Result<(), ApiError> {
    while let Some(event) = events.next().await {
        for u in fold.apply(event) {
            timing.observe(state, &u);
            if let Update::Failed(e) = u {
                return Err(e.into());
            }
            each(&u);
        }
    }
    for u in fold.close() {
        each(&u);
    }
    timing.done(state);
    Ok(())
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

/// An SSE response from a stream of JSON chunks, ending with `[DONE]` (OpenAI's chat
/// and completions streams), with keep-alive comments while nothing is sent.
pub fn sse_response<S>(chunks: S, keepalive_secs: u64) -> axum::response::Response
where
    S: Stream<Item = serde_json::Value> + Send + 'static,
{
    use axum::response::sse::Event;
    let events = chunks
        .map(|c| Event::default().data(c.to_string()))
        .chain(stream::once(async { Event::default().data("[DONE]") }));
    sse(events, keepalive_secs)
}

/// An SSE response of named events (`event: <name>`, `data: <json>`), as the Responses
/// and Messages APIs stream: no `[DONE]`, their last event says the end.
pub fn sse_named_response<S>(events: S, keepalive_secs: u64) -> axum::response::Response
where
    S: Stream<Item = (&'static str, serde_json::Value)> + Send + 'static,
{
    use axum::response::sse::Event;
    sse(
        events.map(|(name, data)| Event::default().event(name).data(data.to_string())),
        keepalive_secs,
    )
}

fn sse<S>(events: S, keepalive_secs: u64) -> axum::response::Response
where
    S: Stream<Item = axum::response::sse::Event> + Send + 'static,
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

/// A chunk as the JSON value an SSE event carries.
pub fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("response types serialize")
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
