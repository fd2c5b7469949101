//! moeserve's HTTP server: OpenAI-compatible routes over the engine of `moeserve-core`.
//! [`router`] builds the axum app around a [`SharedState`]; [`serve`] listens, loads the
//! model, serves until SIGTERM/SIGINT and drains. The `moeserve` binary is a thin
//! command line over this.

pub mod api;
pub mod cli;
pub mod error;
mod extract;
pub mod generation;
pub mod listener;
pub mod metrics;
mod middleware;
pub mod openapi;
pub mod progress;
mod routes;
pub mod settings;
pub mod state;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::Request;
use axum::middleware as mw;
use axum::routing::{get, post};
use axum::Router;

pub use state::{AppState, LoadedEngine, SharedState};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// The app: every route, behind the API-key check where it applies, counted and traced.
pub fn router(state: SharedState) -> Router {
    // /metrics is behind the key unless `public_metrics` says scrapers get it without.
    let metrics = Router::new().route("/metrics", get(routes::health::metrics));
    let (public_metrics, protected_metrics) = if state.settings.public_metrics {
        (metrics, Router::new())
    } else {
        (Router::new(), metrics)
    };
    let protected = Router::new()
        .merge(protected_metrics)
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::completions::completions))
        .route("/v1/responses", post(routes::responses::create))
        .route("/v1/responses/compact", post(routes::responses::compact))
        .route(
            "/v1/responses/{id}",
            get(routes::responses::retrieve).delete(routes::responses::delete),
        )
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{*id}", get(routes::models::retrieve))
        .route("/openapi.json", get(routes::openapi::openapi))
        .route_layer(mw::from_fn_with_state(state.clone(), middleware::auth));
    // Anthropic's Messages API: its errors in its own shape.
    let anthropic = Router::new()
        .route("/v1/messages", post(routes::messages::messages))
        .route("/v1/messages/count_tokens", post(routes::messages::count_tokens))
        .route_layer(mw::from_fn_with_state(state.clone(), middleware::auth))
        .layer(mw::map_response(middleware::anthropic_errors));
    // The built-in page is open to anyone who can reach the server (it asks for the key
    // when the API needs one); its numbers are behind the key like the API.
    let web = if state.settings.web_ui {
        Router::new()
            .route("/", get(routes::web::index))
            .route("/ui/app.js", get(routes::web::app_js))
            .route("/ui/style.css", get(routes::web::style))
            .merge(
                Router::new()
                    .route("/ui/stats", get(routes::web::stats))
                    .route_layer(mw::from_fn_with_state(state.clone(), middleware::auth)),
            )
    } else {
        Router::new()
    };
    Router::new()
        .merge(protected)
        .merge(anthropic)
        .merge(public_metrics)
        .merge(web)
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(mw::from_fn_with_state(state.clone(), middleware::count))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.settings.max_body_bytes,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                    tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
                })
                .on_failure(log_failure),
        )
        .with_state(state)
}

/// A 5xx answer is logged as an error, except 503: it is how `/ready` tells a probe the
/// model is still loading or the server is draining, and how requests are turned away
/// then; that is the server working as meant.
fn log_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: Duration,
    _span: &tracing::Span,
) {
    use tower_http::classify::ServerErrorsFailureClass;
    match class {
        ServerErrorsFailureClass::StatusCode(s) if s == axum::http::StatusCode::SERVICE_UNAVAILABLE => {
            tracing::debug!(latency_ms = latency.as_millis() as u64, "503: unavailable")
        }
        class => tracing::error!(
            latency_ms = latency.as_millis() as u64,
            "response failed: {class}"
        ),
    }
}

/// Listens at once (so /health answers while the model loads), loads the model, serves
/// until SIGTERM/SIGINT, drains, exits.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    moeserve_core::parse_dtype_setting(&settings.dtype).map_err(anyhow::Error::msg)?;
    moeserve_core::parse_kv_dtype_setting(&settings.kv_cache_dtype).map_err(anyhow::Error::msg)?;
    // A device this binary cannot use, or a kernel set (MOESERVE_CPU) this CPU cannot
    // run, is refused before anything listens.
    let device = moeserve_core::device_from_setting(&settings.device).map_err(anyhow::Error::msg)?;
    let backend = moeserve_core::LoadOptions {
        device,
        ..Default::default()
    }
    .backend()?;
    tracing::info!("kernels: {}", backend.describe());
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
        started: crate::api::unix_now(),
        responses: store::ResponseStore::new(
            settings.responses_store_max,
            Duration::from_secs(settings.responses_store_ttl_secs),
        ),
        loading: Default::default(),
    });
    state.metrics.set_kernels(backend);
    let loader = state.clone();
    // A bar only where a person watches: a terminal, with text logs.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr()) && settings.log_format != "json";
    let reporter =
        progress::StartupProgress::new(state.loading.clone(), terminal, Duration::from_secs(5)).reporter();
    tokio::task::spawn_blocking(move || match state::load(&loader.settings, backend, reporter) {
        Ok(m) => {
            tracing::info!(
                "serving {} at http://{}:{}",
                m.id,
                loader.settings.host,
                loader.settings.port
            );
            let _ = loader.model.set(m);
            loader.loading.clear();
        }
        Err(e) => {
            tracing::error!("cannot load the model: {e:#}");
            std::process::exit(1);
        }
    });
    let app = router(state.clone());
    let shutdown_state = state.clone();
    listener::serve(listener, app, settings.connection_limits(), async move {
        shutdown_signal().await;
        drain(shutdown_state);
    })
    .await;
    let flushing = state.clone();
    let _ = tokio::task::spawn_blocking(move || flush_prefix_cache(&flushing)).await;
    tracing::info!("shut down");
    Ok(())
}

/// Lets the disk tier's writer finish the blocks it holds (a few seconds at most), so
/// that the next start finds them. A write cut short leaves only a temporary file,
/// never a block file.
fn flush_prefix_cache(state: &SharedState) {
    if let Some(d) = state.model.get().and_then(|m| m.engine.disk_tier()) {
        let pending = d.pending();
        if !d.flush(Duration::from_secs(5)) {
            tracing::warn!(
                "prefix cache on disk: {} of {pending} queued blocks not written",
                d.pending()
            );
        }
    }
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
        let _ = tokio::task::spawn_blocking(move || flush_prefix_cache(&state)).await;
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// Log lines, captured.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `/ready` answering 503 while the model loads is how it tells a probe to wait, not
    /// an error: it is not logged as one (it was, on every probe).
    #[tokio::test]
    async fn a_not_ready_probe_is_not_logged_as_an_error() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let state = Arc::new(AppState {
            settings: Settings::resolve(&Default::default()).unwrap(),
            model: OnceLock::new(),
            metrics: Metrics::new(),
            draining: AtomicBool::new(false),
            started: 0,
            responses: store::ResponseStore::new(0, Duration::from_secs(1)),
            loading: Default::default(),
        });
        let req = axum::http::Request::get("/ready")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = router(state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 503);
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("503"), "the 503 is still logged, at debug: {log}");
        assert!(!log.contains("ERROR"), "{log}");
        // A 500 still is an error.
        log_failure(
            tower_http::classify::ServerErrorsFailureClass::StatusCode(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            ),
            Duration::from_millis(1),
            &tracing::Span::none(),
        );
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(log.contains("ERROR"), "{log}");
    }
}
