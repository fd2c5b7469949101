//! `/health` (liveness), `/ready` (model loaded, not draining), `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::responses::{ErrorResponse, Health, Ready};
use crate::error::ApiError;
use crate::state::SharedState;

#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process runs.", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "The model is loaded and requests are taken.", body = Ready),
        (status = 503, description = "Loading, or draining for shutdown.", body = ErrorResponse),
    ))]
pub async fn ready(State(state): State<SharedState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return ApiError::Unavailable("The server is shutting down.").into_response();
    }
    match state.model.get() {
        Some(m) => (
            StatusCode::OK,
            Json(Ready {
                status: "ready".into(),
                model: m.id.clone(),
            }),
        )
            .into_response(),
        None => ApiError::Unavailable("The model is still loading.").into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition.", body = String, content_type = "text/plain"),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
    ),
    security(("api_key" = [])))]
pub async fn metrics(State(state): State<SharedState>) -> Response {
    let body = state.metrics.render(
        state.model.get().map(|m| m.engine.stats()),
        state.settings.block_size,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}
