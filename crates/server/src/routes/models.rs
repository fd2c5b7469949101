//! `GET /v1/models`, `GET /v1/models/{id}`

use axum::extract::{Path, State};
use axum::Json;

use crate::api::responses::{ErrorResponse, ListObject, ModelCard, ModelList, ModelObject};
use crate::error::ApiError;
use crate::state::{LoadedEngine, SharedState};

fn card(m: &LoadedEngine, created: u64) -> ModelCard {
    ModelCard {
        id: m.id.clone(),
        object: ModelObject::Model,
        created,
        owned_by: "moeserve".into(),
        max_model_len: m.engine.limits().context_length,
    }
}

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "The served model.", body = ModelList),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
        (status = 503, description = "The model is loading, or the server is shutting down.", body = ErrorResponse),
    ),
    security(("api_key" = [])))]
pub async fn list(State(state): State<SharedState>) -> Result<Json<ModelList>, ApiError> {
    let m = state.engine()?;
    Ok(Json(ModelList {
        object: ListObject::List,
        data: vec![card(m, state.started)],
    }))
}

#[utoipa::path(get, path = "/v1/models/{id}", tag = "models", operation_id = "retrieve_model",
    params(("id" = String, Path, description = "The model id (it may contain `/`).")),
    responses(
        (status = 200, description = "The model.", body = ModelCard),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
        (status = 404, description = "Not the served model.", body = ErrorResponse),
        (status = 503, description = "The model is loading, or the server is shutting down.", body = ErrorResponse),
    ),
    security(("api_key" = [])))]
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let m = state.engine_for(&id)?;
    Ok(Json(card(m, state.started)))
}
