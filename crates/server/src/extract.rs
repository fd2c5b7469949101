//! Request extractors whose failures come out as [`ApiError`]s.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body whose errors come out in OpenAI's shape: 413 over the size limit, 415
/// without a JSON content type, 400 naming the field for bad JSON or wrong types.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json") || ct.contains("+json"));
        if !json_type {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge(limit)
            } else {
                ApiError::invalid(format!("cannot read the request body: {e}"), None)
            }
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(de) {
            Ok(v) => Ok(ApiJson(v)),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let param = (path != "." && !path.is_empty()).then_some(path);
                let message = if inner.is_syntax() || inner.is_eof() {
                    format!("invalid JSON: {inner}")
                } else {
                    match &param {
                        Some(p) => format!("invalid value for `{p}`: {inner}"),
                        None => format!("invalid request: {inner}"),
                    }
                };
                Err(ApiError::invalid(message, param))
            }
        }
    }
}

/// The body size limit, put in the request's extensions by the middleware (for the 413
/// message).
#[derive(Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);
