//! `GET /openapi.json`: the document generated from the API's types and routes.

use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use crate::api::responses::ErrorResponse;
use crate::openapi::ApiDoc;

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses(
        (status = 200, description = "This document (OpenAPI 3.1).", body = Object),
        (status = 401, description = "A missing or wrong API key.", body = ErrorResponse),
    ),
    security(("api_key" = [])))]
pub async fn openapi() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
