//! Inbound metrics. One static per metric; the doc comment is the HELP text. Labels have low
//! cardinality: the listener name and a result or reason category, never addresses or domains.

use std::sync::LazyLock;

use mailroom_telemetry::register;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts};

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

/// Connections by listener and result (accepted, limit_total, limit_per_ip, proxy_error, tls_error, plugin_reject).
pub static CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_inbound_connections_total",
        "Inbound connections by listener and result.",
        &["listener", "result"],
    )
});

/// Sessions currently open, by listener.
pub static SESSIONS_ACTIVE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "mailroom_inbound_sessions_active",
                "Inbound SMTP sessions currently open.",
            ),
            &["listener"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Messages durably queued, by listener.
pub static MESSAGES_ACCEPTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_inbound_messages_accepted_total",
        "Messages durably queued and acknowledged with 250.",
        &["listener"],
    )
});

/// Messages refused at or after DATA, by listener and reason.
pub static MESSAGES_REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_inbound_messages_rejected_total",
        "Messages refused at end of data (too_large, bare_line_ending, line_too_long, nul, plugin, queue_error).",
        &["listener", "reason"],
    )
});

/// Recipients refused, by listener and reason.
pub static RECIPIENTS_REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_inbound_recipients_rejected_total",
        "Recipients refused (relay_denied, too_many, smtputf8, plugin).",
        &["listener", "reason"],
    )
});

/// Protocol errors (syntax, sequence, limits), by listener and kind.
pub static PROTOCOL_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_inbound_protocol_errors_total",
        "SMTP protocol errors by kind.",
        &["listener", "kind"],
    )
});

/// Sessions ended by a timeout, too many errors or shutdown.
pub static SESSIONS_CLOSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_inbound_sessions_closed_total",
        "Sessions ended, by reason (quit, eof, timeout, too_many_errors, shutdown, io_error, plugin).",
        &["listener", "reason"],
    )
});

/// Time from end of data to the queue's durable acknowledgement.
pub static ENQUEUE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "mailroom_inbound_enqueue_duration_seconds",
                "Time to store a message durably in the queue.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});
