//! Every error a client can get, mapped to its HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}` in this one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::responses::{ErrorDetail, ErrorResponse};

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400: malformed JSON, wrong types, values out of range.
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401
    Unauthorized,
    /// 404: an unknown model.
    ModelNotFound(String),
    /// 404: an unknown route.
    RouteNotFound(String),
    /// 404: something a request names by id that does not exist (a stored response).
    NotFound {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// 405
    MethodNotAllowed,
    /// 413
    BodyTooLarge(usize),
    /// 415
    UnsupportedMediaType,
    /// 429: the waiting queue is full; retry after this many seconds.
    QueueFull { retry_after_secs: u64 },
    /// 503: loading or shutting down.
    Unavailable(&'static str),
    /// 500
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message, Some(param.to_string()))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) | ApiError::NotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// (message, type, param, code)
    fn parts(&self) -> (String, &'static str, Option<String>, Option<&'static str>) {
        match self {
            ApiError::InvalidRequest { message, param, code } => {
                (message.clone(), "invalid_request_error", param.clone(), *code)
            }
            ApiError::Unauthorized => (
                "Incorrect or missing API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.".into(),
                "authentication_error",
                None,
                Some("invalid_api_key"),
            ),
            ApiError::ModelNotFound(m) => (
                format!("The model `{m}` does not exist."),
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
            ),
            ApiError::NotFound { message, param, code } => (
                message.clone(),
                "invalid_request_error",
                param.clone(),
                Some(*code),
            ),
            ApiError::RouteNotFound(path) => (
                format!("Unknown route {path}."),
                "invalid_request_error",
                None,
                Some("unknown_url"),
            ),
            ApiError::MethodNotAllowed => (
                "Method not allowed for this route.".into(),
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ),
            ApiError::BodyTooLarge(limit) => (
                format!("The request body is larger than the limit of {limit} bytes."),
                "invalid_request_error",
                None,
                Some("request_too_large"),
            ),
            ApiError::UnsupportedMediaType => (
                "Expected a JSON body with `Content-Type: application/json`.".into(),
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
            ApiError::QueueFull { .. } => (
                "The server is at capacity: too many requests are waiting. Retry shortly.".into(),
                "rate_limit_error",
                None,
                Some("rate_limit_exceeded"),
            ),
            ApiError::Unavailable(why) => (
                (*why).to_string(),
                "server_error",
                None,
                Some("service_unavailable"),
            ),
            ApiError::Internal(m) => (m.clone(), "server_error", None, None),
        }
    }

    /// The body ([`ErrorResponse`]).
    pub fn response(&self) -> ErrorResponse {
        let (message, kind, param, code) = self.parts();
        ErrorResponse {
            error: ErrorDetail {
                message,
                kind: kind.into(),
                param,
                code: code.map(Into::into),
            },
        }
    }

    /// The body as JSON (also sent inside an SSE stream when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.response()).expect("error bodies serialize")
    }

    /// The body in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`,
    /// for the Messages API (its SDKs read the error's type from it); the parameter, which
    /// that shape has no field for, leads the message.
    pub fn anthropic_body(&self) -> serde_json::Value {
        let kind = match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        };
        let (message, _, param, _) = self.parts();
        let message = match param {
            Some(p) if !message.contains(&p) => format!("{p}: {message}"),
            _ => message,
        };
        serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.response())).into_response();
        // Routes of other APIs re-render it in their own shape (`anthropic_errors`).
        resp.extensions_mut().insert(self.clone());
        if let ApiError::QueueFull { retry_after_secs } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl ApiError {
    /// Why the engine refused a request, in OpenAI's terms: `prompt_param` names the field
    /// the prompt came from (`messages` for chat, `prompt` for completions);
    /// `retry_after_secs` is what a 429 tells the client.
    pub fn from_submit(
        e: moeserve_core::engine::SubmitError,
        prompt_param: &str,
        retry_after_secs: u64,
    ) -> Self {
        use moeserve_core::engine::SubmitError;
        let message = e.to_string();
        match e {
            SubmitError::InvalidParameter(p) => ApiError::invalid_param(p.param, p.message),
            SubmitError::InvalidPrompt(_) => ApiError::invalid_param(prompt_param, message),
            SubmitError::ContextLengthExceeded { max_tokens, .. } => ApiError::InvalidRequest {
                message,
                param: Some(
                    if max_tokens.is_some() {
                        "max_tokens"
                    } else {
                        prompt_param
                    }
                    .to_string(),
                ),
                code: Some("context_length_exceeded"),
            },
            SubmitError::QueueFull { .. } => ApiError::QueueFull { retry_after_secs },
            SubmitError::Stopped => ApiError::Unavailable("The server is shutting down."),
        }
    }
}

impl From<moeserve_core::engine::EngineFailure> for ApiError {
    fn from(e: moeserve_core::engine::EngineFailure) -> Self {
        match e.kind {
            moeserve_core::engine::FailureKind::Aborted => {
                ApiError::Unavailable("The server shut down before the request finished.")
            }
            _ => ApiError::Internal(e.to_string()),
        }
    }
}
