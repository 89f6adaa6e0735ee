//! The small HTTP server of every process: `/metrics` (Prometheus text format), `/healthz`
//! (the process is alive) and `/readyz` (it can take work: listeners bound, queue reachable).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// A readiness probe: returns `Ok(())` when ready, or the reason it is not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The HTTP endpoint could not start.
#[derive(Debug, Error)]
pub enum HttpError {
    /// Binding the address failed.
    #[error("http.address {addr}: cannot listen: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

async fn metrics() -> impl IntoResponse {
    let families = prometheus::gather();
    let mut body = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut body) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            e.to_string(),
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
}

async fn readyz(State(ready): State<Readiness>) -> impl IntoResponse {
    match ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Binds `addr` and serves the endpoints until `shutdown` is cancelled. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve_http(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http endpoint failed");
        }
    });
    Ok((local, task))
}
