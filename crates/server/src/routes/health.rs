//! `/health` (liveness), `/ready` (model loaded, not draining), `/metrics`, `/openapi.json`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::server::SharedState;

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<SharedState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return ApiError::Unavailable("The server is shutting down.").into_response();
    }
    match state.model.get() {
        Some(m) => (StatusCode::OK, Json(json!({"status": "ready", "model": m.id}))).into_response(),
        None => ApiError::Unavailable("The model is still loading.").into_response(),
    }
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    let body = state.metrics.render(state.model.get().map(|m| m.engine.stats()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The OpenAPI document of these routes, kept beside the code as a JSON file.
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
        .into_response()
}
