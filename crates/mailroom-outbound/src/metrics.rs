//! Outbound metrics. One static per metric; the doc comment is the HELP text. Labels are the
//! policy name and an outcome category, never addresses or domains.

use std::sync::LazyLock;

use mailroom_telemetry::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};

/// Recipients by policy and outcome (delivered, deferred, bounced, expired).
pub static RECIPIENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_outbound_recipients_total",
                "Recipients by delivery policy and outcome of the attempt.",
            ),
            &["policy", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Duration of delivery attempts (route, connect, transaction), by policy.
pub static ATTEMPT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "mailroom_outbound_attempt_duration_seconds",
                "Duration of one delivery attempt of a domain entry.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["policy"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Outbound SMTP connections open (in use or pooled).
pub static CONNECTIONS_OPEN: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "mailroom_outbound_connections_open",
            "Outbound SMTP connections open, in use or idle in the pool.",
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});
