//! Outbound delivery: the workers that take domain entries from the queue and deliver them.
//!
//! Flow per leased entry: route (MX lookup, or the policy's relay) -> connection (SMTP client,
//! STARTTLS by TLS policy) -> per-recipient outcome: 2xx delivered, 4xx and connection errors
//! deferred on the policy's retry schedule, 5xx bounced with an RFC 3464 DSN to the sender
//! (never to the null sender) -> delivery log line and metrics -> ack or defer the lease.
//!
//! Modules:
//! - [`client`]: the SMTP client over `mailroom-smtp` (EHLO/HELO, STARTTLS, PIPELINING, SIZE,
//!   SMTPUTF8, dot-stuffing, per-stage timeouts, connection reuse).
//! - [`mx`]: MX resolution with hickory-resolver (preference order, shuffle, implicit MX, null
//!   MX, address families, address filtering).
//! - [`dsn`]: delivery status notifications (RFC 3464 multipart/report).
//! - [`dkim`]: DKIM signing (RSA-SHA256, Ed25519-SHA256) by the domain of `From:`.
//! - [`shaping`]: per-destination limits held across all workers (connections, rates).
//! - [`outcome`]: per-recipient outcomes and what they mean for the lease.
//! - [`worker`]: the loop that leases, delivers, logs, bounces and acks or defers.

pub mod client;
pub mod dkim;
pub mod dsn;
mod metrics;
pub mod mx;
pub mod outcome;
mod pool;
mod rules;
pub mod shaping;
pub mod worker;

pub use worker::{Worker, WorkerDeps, WorkerError};
