//! The HTTP connection loop: hyper's server builder with limits a public endpoint needs
//! and `axum::serve` does not expose: request heads are capped (431 beyond
//! `max_header_bytes`), a connection gets `header_read_timeout_secs` to send each request
//! head (slow and half-open clients are dropped, never holding a request up: every
//! connection is its own task), and shutdown is graceful (no new connections, open ones
//! finish their responses).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// The connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Largest request head (request line and headers) in bytes; hyper's floor is 8192.
    pub max_header_bytes: usize,
    /// Time to send a request head, from the connection's start or the previous response.
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits for the open
/// connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(limits.max_header_bytes.max(8192))
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service =
            TowerToHyperService::new(app.clone().map_request(
                |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
            ));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte = limits.header_read_timeout;
        tokio::spawn(async move {
            // hyper's head timeout starts once the protocol is known; a client that sends
            // nothing at all is dropped after the same time.
            let mut byte = [0u8; 1];
            match tokio::time::timeout(first_byte, stream.peek(&mut byte)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return, // closed or failed before sending anything
                Err(_) => {
                    tracing::debug!("{peer}: nothing sent within {first_byte:?}; closed");
                    return;
                }
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!("{peer}: connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
