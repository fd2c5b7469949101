//! One module per endpoint, and what the generation endpoints share: merging the event
//! streams of a request's engine requests, per-request deadlines, latency metrics.

pub mod chat;
pub mod completions;
pub mod health;
pub mod models;

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::stream::{self, Stream, StreamExt};
use moeserve_core::engine::{EngineEvent, FinishReason, RequestHandle, TokenLogprob, Usage};
use moeserve_core::TextCodec;
use serde_json::Value;

use crate::server::AppState;

pub const SYSTEM_FINGERPRINT: &str = concat!("moeserve-", env!("CARGO_PKG_VERSION"));

/// Every event of a request's engine requests (several for a multi-prompt completion),
/// tagged with the engine request's position. Ends when all have sent `Done`; a deadline
/// drops the handles (aborting the engine requests) and ends the choices with `length`.
pub type Events = Pin<Box<dyn Stream<Item = (usize, EngineEvent)> + Send>>;

pub fn merge(handles: Vec<RequestHandle>, deadline: Option<Duration>) -> Events {
    let streams = handles.into_iter().enumerate().map(|(i, h)| {
        stream::unfold(Some(h), move |h| async move {
            let mut h = h?;
            match h.next().await {
                Some(ev @ EngineEvent::Done(_)) | Some(ev @ EngineEvent::Error(_)) => Some(((i, ev), None)),
                Some(ev) => Some(((i, ev), Some(h))),
                None => None,
            }
        })
        .boxed()
    });
    let merged = stream::select_all(streams);
    let Some(deadline) = deadline else {
        return merged.boxed();
    };
    let deadline = tokio::time::Instant::now() + deadline;
    stream::unfold(Some(merged), move |s| async move {
        let mut s = s?;
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(item)) => Some((item, Some(s))),
            Ok(None) => None,
            // Dropping the merged stream drops the handles, which aborts the requests.
            Err(_) => Some((
                (
                    usize::MAX,
                    EngineEvent::Finished {
                        index: usize::MAX,
                        reason: FinishReason::Length,
                    },
                ),
                None,
            )),
        }
    })
    .boxed()
}

/// Accumulated output of one choice.
#[derive(Debug, Default, Clone)]
pub struct ChoiceState {
    pub text: String,
    pub tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
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

    pub fn token(&mut self, state: &AppState) {
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

/// The text of one token, for logprobs (partial characters come out as U+FFFD).
pub fn token_text(codec: &TextCodec, id: u32) -> String {
    codec.decode(&[id], false).unwrap_or_default()
}

/// `finish_reason` as OpenAI names it; an engine abort (shutdown) reports `length`.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Abort => "length",
    }
}

/// Adds `b` into `a`.
pub fn add_usage(a: &mut Usage, b: &Usage) {
    a.prompt_tokens += b.prompt_tokens;
    a.completion_tokens += b.completion_tokens;
    a.cached_tokens += b.cached_tokens;
}

pub fn usage_json(u: &Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Tokenizes off the async runtime's workers.
pub async fn encode(
    codec: std::sync::Arc<TextCodec>,
    text: String,
) -> Result<Vec<u32>, crate::error::ApiError> {
    tokio::task::spawn_blocking(move || codec.encode(&text))
        .await
        .map_err(|e| crate::error::ApiError::Internal(e.to_string()))?
        .map_err(|e| crate::error::ApiError::invalid(format!("cannot tokenize the prompt: {e}"), None))
}

/// An SSE response from a stream of JSON chunks, ending with `[DONE]`, with keep-alive
/// comments while nothing is sent.
pub fn sse_response<S>(chunks: S, keepalive_secs: u64) -> axum::response::Response
where
    S: Stream<Item = serde_json::Value> + Send + 'static,
{
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let events = chunks
        .map(|c| Event::default().data(c.to_string()))
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(keepalive_secs.max(1)))
                .text("keep-alive"),
        )
        .into_response()
}

/// A response object: `object` is `chat.completion`, `text_completion`, ...
pub fn envelope(id: &str, object: &str, created: u64, model: &str, choices: Value) -> Value {
    serde_json::json!({"id": id, "object": object, "created": created, "model": model,
                       "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices})
}

/// Builds the stream's chunks: each carries `"usage": null` when the client asked for a
/// final usage chunk.
pub fn chunk_builder(
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl Fn(Value) -> Value {
    move |choices| {
        let mut c = envelope(&id, object, created, &model, choices);
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    }
}

/// `stream_options.include_usage`
pub fn include_usage(o: &Option<crate::openai::StreamOptions>) -> bool {
    o.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
}
