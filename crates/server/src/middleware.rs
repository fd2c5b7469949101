//! The layers every request passes: API keys, response counting, the 404 fallback.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::extract::BodyLimit;
use crate::state::SharedState;

pub(crate) async fn auth(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let keys = &state.settings.api_keys;
    if !keys.is_empty() {
        // OpenAI's clients send `Authorization: Bearer`, Anthropic's `x-api-key`.
        let headers = req.headers();
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .unwrap_or("");
        // Constant time per key, and every key is compared.
        let mut ok = subtle::Choice::from(0);
        for k in keys {
            ok |= if k.len() == given.len() {
                k.as_bytes().ct_eq(given.as_bytes())
            } else {
                subtle::Choice::from(0)
            };
        }
        if !bool::from(ok) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Counts every response by endpoint and status.
pub(crate) async fn count(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    req.extensions_mut()
        .insert(BodyLimit(state.settings.max_body_bytes));
    let endpoint = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .with_label_values(&[&endpoint, resp.status().as_str()])
        .inc();
    resp
}

/// Errors of the Anthropic Messages API's routes in Anthropic's shape: every
/// [`ApiError`] response (from the handler, the body extractor or the key check) carries
/// the error, and is re-rendered here with the same status and headers.
pub(crate) async fn anthropic_errors(resp: Response) -> Response {
    let Some(e) = resp.extensions().get::<ApiError>().cloned() else {
        return resp;
    };
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(e.anthropic_body().to_string()))
}

pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
}
