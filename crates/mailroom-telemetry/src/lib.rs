//! Observability shared by every Mailroom process: tracing setup ([`init_tracing`]), the
//! Prometheus registry (metrics are statics registered in the default registry, beside the code
//! that updates them), the HTTP endpoints `/metrics`, `/healthz` and `/readyz`
//! ([`serve_http`]), and the JSON delivery log ([`DeliveryLog`]).

mod delivery_log;
mod http;

pub use delivery_log::{DeliveryLog, DeliveryLogError};
pub use http::{HttpError, Readiness, serve_http};

use tracing_subscriber::EnvFilter;

/// Output format of the process log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level` when set. Calling it
/// twice is harmless (the second call is ignored).
pub fn init_tracing(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Registers `collector` in the default Prometheus registry and returns it. A collector that
/// is already registered (same name) is returned as is, so tests that start two servers work.
pub fn register<T: prometheus::core::Collector + Clone + 'static>(collector: T) -> T {
    let _ = prometheus::default_registry().register(Box::new(collector.clone()));
    collector
}
