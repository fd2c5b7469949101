//! One module per endpoint, and what the generation endpoints share: running a request
//! to its end, latency metrics, token texts, the SSE response.

pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
pub mod openapi;

use std::time::{Duration, Instant};

use futures::stream::{self, Stream, StreamExt};
use moeserve_core::TextCodec;

use crate::error::ApiError;
use crate::generation::{Events, Fold, Update};
use crate::state::AppState;

pub const SYSTEM_FINGERPRINT: &str = concat!("moeserve-", env!("CARGO_PKG_VERSION"));

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
/// then the choices still open closed. An engine failure is the request's error.
pub async fn run_to_end(
    state: &AppState,
    mut events: Events,
    fold: &mut Fold,
    timing: &mut Timing,
) -> Result<(), ApiError> {
    while let Some(event) = events.next().await {
        for u in fold.apply(event) {
            timing.observe(state, &u);
            if let Update::Failed(e) = u {
                return Err(e.into());
            }
        }
    }
    fold.close();
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

/// A chunk as the JSON value an SSE event carries.
pub fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("response types serialize")
}

/// `stream_options.include_usage`
pub fn include_usage(o: &Option<crate::api::requests::StreamOptions>) -> bool {
    o.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
}
