//! The inbound SMTP server. A [`Listener`] binds one `ListenerSpec`, accepts connections and
//! runs a [`Session`] for each: greeting, EHLO, optional STARTTLS / AUTH, MAIL, RCPT, DATA or
//! BDAT, with the listener's plugin chain asked at every hook. A message is answered with 250
//! only after the queue has stored it durably (see `session/data.rs`).
//!
//! Flow: `server` (accept, limits, PROXY, TLS) -> `session` (one file per verb family) ->
//! `received` (trace header) -> `mailroom_queue::Queue::enqueue`.

mod auth;
mod conn;
mod context;
mod limits;
mod metrics;
mod proxy;
mod received;
pub mod report;
mod server;
mod session;
mod tls;

pub use auth::UserDb;
pub use conn::{Prefixed, SmtpStream};
pub use context::{InboundDeps, ListenerContext};
pub use server::{Listener, Shutdown};
pub use session::{Ended, Session};
pub use tls::load_certified_key;

use thiserror::Error;

/// A listener that cannot start; every variant names the listener.
#[derive(Debug, Error)]
pub enum InboundError {
    /// The address cannot be bound.
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot be used.
    #[error("listener {listener}: TLS: {reason}")]
    Tls {
        /// Listener name.
        listener: String,
        /// What is wrong.
        reason: String,
    },
    /// The users file cannot be used.
    #[error("listener {listener}: auth: {reason}")]
    Auth {
        /// Listener name.
        listener: String,
        /// What is wrong.
        reason: String,
    },
    /// A plugin entry cannot be built.
    #[error(transparent)]
    Plugin(#[from] mailroom_plugins::PluginError),
}
