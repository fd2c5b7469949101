//! The built-in page: `GET /` (a chat playground and a live dashboard, static files
//! embedded in the binary, no network at run time) and `GET /ui/stats`, the dashboard's
//! numbers as one small JSON object (cheaper to make and to read than the whole
//! Prometheus exposition). `--no-web-ui` turns both off.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::state::SharedState;

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");

/// Only this server's own files: no inline scripts, nothing from elsewhere.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'";

fn file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    file(INDEX, "text/html; charset=utf-8")
}

pub async fn app_js() -> Response {
    file(APP_JS, "text/javascript; charset=utf-8")
}

pub async fn style() -> Response {
    file(STYLE, "text/css; charset=utf-8")
}

/// What the dashboard shows, as running totals and gauges: the page keeps a minute of
/// these and computes rates and windows from their differences.
#[derive(Debug, Serialize)]
pub struct UiStats {
    /// The served model's id; `None` while it loads.
    pub model: Option<String>,
    /// `loading`, `ready` or `draining`.
    pub state: &'static str,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Time to first token over every endpoint: bucket upper bounds in seconds and the
    /// cumulative count at each.
    pub ttft: Histogram,
    /// Tokens routed to each expert since start, per layer (empty rows: dense layers).
    pub experts: Vec<Vec<u64>>,
}

#[derive(Debug, Serialize)]
pub struct Histogram {
    pub le: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
}

pub async fn stats(State(state): State<SharedState>) -> Json<UiStats> {
    let model = state.model.get();
    let (le, cumulative, count) = state.metrics.ttft_buckets();
    let mut s = UiStats {
        model: model.map(|m| m.id.clone()),
        state: if state.draining.load(Ordering::Relaxed) {
            "draining"
        } else if model.is_some() {
            "ready"
        } else {
            "loading"
        },
        prompt_tokens: 0,
        generation_tokens: 0,
        prefix_cache_hit_tokens: 0,
        running: 0,
        waiting: 0,
        kv_blocks_used: 0,
        kv_blocks_total: 0,
        ttft: Histogram {
            le,
            cumulative,
            count,
        },
        experts: vec![],
    };
    if let Some(m) = model {
        let e = m.engine.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        s.prompt_tokens = load(&e.prompt_tokens);
        s.generation_tokens = load(&e.generation_tokens);
        s.prefix_cache_hit_tokens = load(&e.prefix_cache_hit_tokens);
        s.running = e.running.load(Ordering::Relaxed);
        s.waiting = e.waiting.load(Ordering::Relaxed);
        s.kv_blocks_used = e.kv_blocks_used.load(Ordering::Relaxed);
        s.kv_blocks_total = e.kv_blocks_total.load(Ordering::Relaxed);
        s.experts = e
            .expert_tokens
            .iter()
            .map(|row| row.iter().map(load).collect())
            .collect();
    }
    Json(s)
}
