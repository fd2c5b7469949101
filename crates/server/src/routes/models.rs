//! `GET /v1/models`, `GET /v1/models/{id}`

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::server::SharedState;

fn model_json(id: &str, created: u64) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "moeserve"})
}

pub async fn list(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let m = state.engine()?;
    Ok(Json(
        json!({"object": "list", "data": [model_json(&m.id, state.started)]}),
    ))
}

pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = state.engine_for(&id)?;
    Ok(Json(model_json(&m.id, state.started)))
}
