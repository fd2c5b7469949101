//! The HTTP server: shared state, the router and its layers, startup and graceful
//! shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use moeserve_core::chat::ChatTemplate;
use moeserve_core::engine::{Engine, EngineConfig};
use moeserve_core::reasoning::ReasoningTags;
use moeserve_core::{DType, KvDtype, LoadOptions};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routes;
use crate::settings::Settings;

/// What the handlers share.
pub struct AppState {
    pub settings: Settings,
    /// Set once the model is loaded and the engine runs.
    pub model: OnceLock<LoadedEngine>,
    pub metrics: Metrics,
    /// Set on SIGTERM/SIGINT: /ready answers 503 and new requests are refused.
    pub draining: AtomicBool,
    pub started: u64,
}

pub struct LoadedEngine {
    pub engine: Engine,
    /// The id clients use.
    pub id: String,
    pub template: Option<ChatTemplate>,
    /// Set when chat output is split into reasoning and content.
    pub reasoning: Option<ReasoningTags>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The engine, or 503 while loading or draining.
    pub fn engine(&self) -> Result<&LoadedEngine, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable("The server is shutting down."));
        }
        self.model
            .get()
            .ok_or(ApiError::Unavailable("The model is still loading."))
    }

    /// Checks the request's `model` against the served one.
    pub fn engine_for(&self, model: &str) -> Result<&LoadedEngine, ApiError> {
        let m = self.engine()?;
        if model != m.id {
            return Err(ApiError::ModelNotFound(model.to_string()));
        }
        Ok(m)
    }
}

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

#[derive(Clone, Copy)]
struct BodyLimit(usize);

async fn auth(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let keys = &state.settings.api_keys;
    if !keys.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
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
async fn count(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
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

async fn not_found(req: Request) -> ApiError {
    ApiError::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
}

pub fn router(state: SharedState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::completions::completions))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{*id}", get(routes::models::retrieve))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(routes::health::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(protected)
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .fallback(not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.settings.max_body_bytes,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
            }),
        )
        .with_state(state)
}

fn parse_dtype(s: &str) -> anyhow::Result<Option<DType>> {
    Ok(match s {
        "" | "auto" => None,
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        other => anyhow::bail!("unknown dtype {other:?} (f32, bf16 or f16)"),
    })
}

/// `auto` (or empty): the loader's choice; else `f32` or `f16`.
pub fn parse_kv_dtype(s: &str) -> anyhow::Result<Option<KvDtype>> {
    Ok(match s {
        "" | "auto" => None,
        other => Some(other.parse().map_err(|e: String| anyhow::anyhow!(e))?),
    })
}

fn load(settings: &Settings) -> anyhow::Result<LoadedEngine> {
    let opts = LoadOptions {
        dtype: parse_dtype(&settings.dtype)?,
        kv_cache_dtype: parse_kv_dtype(&settings.kv_cache_dtype)?,
        ..LoadOptions::default()
    };
    let loaded = moeserve_core::load(&settings.model, &opts)?;
    let template = match loaded.codec.chat_template() {
        Some(src) => {
            let tok = |id: Option<u32>| id.and_then(|i| loaded.codec.tokenizer().id_to_token(i));
            Some(ChatTemplate::new(
                src,
                tok(loaded.codec.bos_token_id()),
                tok(loaded.codec.eos_token_ids().first().copied()),
            )?)
        }
        None => {
            tracing::warn!("the model has no chat template: /v1/chat/completions will refuse requests");
            None
        }
    };
    let config = EngineConfig {
        block_size: settings.block_size,
        kv_cache_memory: moeserve_core::parse_memory_size(&settings.kv_cache_memory)
            .map_err(anyhow::Error::msg)?,
        max_num_seqs: settings.max_num_seqs,
        max_num_batched_tokens: settings.max_num_batched_tokens,
        max_waiting_requests: settings.max_waiting_requests,
        enable_prefix_caching: settings.enable_prefix_caching,
    };
    let id = if settings.served_model_name.is_empty() {
        loaded.name.clone()
    } else {
        settings.served_model_name.clone()
    };
    let tags = ReasoningTags::from_codec(&loaded.codec);
    let reasoning = match settings.reasoning_parser.as_str() {
        "none" => None,
        "deepseek-r1" => Some(tags.ok_or_else(|| {
            anyhow::anyhow!(
                "--reasoning-parser deepseek-r1: the model's vocabulary has no <think> and </think> tokens"
            )
        })?),
        "auto" => tags.filter(|t| {
            loaded
                .codec
                .chat_template()
                .is_some_and(|tpl| tpl.contains(&t.start))
        }),
        other => anyhow::bail!("unknown reasoning parser {other:?} (auto, deepseek-r1 or none)"),
    };
    if let Some(t) = &reasoning {
        tracing::info!(
            "reasoning output: text between {} and {} goes to reasoning_content",
            t.start,
            t.end
        );
    }
    let engine = Engine::start(loaded.model, Arc::new(loaded.codec), config)?;
    Ok(LoadedEngine {
        engine,
        id,
        template,
        reasoning,
    })
}

/// Listens at once (so /health answers while the model loads), loads the model, serves
/// until SIGTERM/SIGINT, drains, exits.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    parse_dtype(&settings.dtype)?;
    parse_kv_dtype(&settings.kv_cache_dtype)?;
    let addr = format!("{}:{}", settings.host, settings.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let state = Arc::new(AppState {
        settings: settings.clone(),
        model: OnceLock::new(),
        metrics: Metrics::new(),
        draining: AtomicBool::new(false),
        started: crate::openai::unix_now(),
    });
    let loader = state.clone();
    tokio::task::spawn_blocking(move || match load(&loader.settings) {
        Ok(m) => {
            tracing::info!(
                "serving {} at http://{}:{}",
                m.id,
                loader.settings.host,
                loader.settings.port
            );
            let _ = loader.model.set(m);
        }
        Err(e) => {
            tracing::error!("cannot load the model: {e:#}");
            std::process::exit(1);
        }
    });
    let app = router(state.clone());
    let shutdown_state = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            drain(shutdown_state);
        })
        .await?;
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Stops taking requests; in-flight ones get `shutdown_timeout_secs`, then are aborted.
fn drain(state: SharedState) {
    state.draining.store(true, Ordering::Relaxed);
    let timeout = Duration::from_secs(state.settings.shutdown_timeout_secs);
    tracing::info!(
        "draining: in-flight requests have {}s to finish",
        timeout.as_secs()
    );
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if let Some(m) = state.model.get() {
            tracing::warn!("shutdown timeout: aborting the remaining requests");
            m.engine.abort_all();
        }
        // Streams end once aborted; give them a moment to flush, then go regardless.
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::process::exit(0);
    });
}
