//! Operator metrics. One static per metric; labels are the resource kind and a static error
//! category ([`crate::controller::Error::category`]), never object names.

use std::sync::LazyLock;

use mailroom_telemetry::register;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Reconciles started, by kind.
pub static RECONCILES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_operator_reconciles_total",
                "Reconciles started, by custom resource kind.",
            ),
            &["kind"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Reconciles that failed, by kind and error category.
pub static RECONCILE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_operator_reconcile_failures_total",
                "Reconciles that failed, by custom resource kind and error category \
                 (InvalidSpec, SecretNotFound, SecretKeyMissing, KubeApi, Queue, Finalizer, \
                 DeletionBlocked).",
            ),
            &["kind", "category"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Duration of reconciles, by kind.
pub static RECONCILE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "mailroom_operator_reconcile_duration_seconds",
                "Duration of one reconcile, by custom resource kind.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});
