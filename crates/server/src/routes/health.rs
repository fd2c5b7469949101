//! `/health` (liveness), `/ready` (model loaded, not draining), `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use moeserve_core::progress::LoadStage;

use crate::api::responses::{ErrorResponse, Health, HealthProgress, Ready};
use crate::error::ApiError;
use crate::state::SharedState;

#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process runs; while the model loads, what the load is doing.", body = Health)))]
pub async fn health(State(state): State<SharedState>) -> Json<Health> {
    let model = if state.draining.load(Ordering::Relaxed) {
        "draining"
    } else if state.model.get().is_some() {
        "ready"
    } else {
        "loading"
    };
    let progress = state
        .loading
        .get()
        .filter(|_| model == "loading")
        .map(|p| HealthProgress {
            stage: match p.stage {
                LoadStage::Download => "download",
                LoadStage::Weights => "weights",
            }
            .into(),
            file: p.file.clone(),
            done_bytes: p.done,
            total_bytes: p.total,
            message: p.to_string(),
        });
    Json(Health {
        status: "ok".into(),
        model: model.into(),
        progress,
    })
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
    let engine = state.model.get().map(|m| &m.engine);
    let body = state.metrics.render(
        engine.map(|e| e.stats()),
        engine.and_then(|e| e.disk_tier()),
        state.settings.block_size,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}
