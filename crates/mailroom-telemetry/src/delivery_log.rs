//! The delivery log: one JSON object per line for each event of a message's life (`reception`,
//! `delivery`, `transient_failure`, `bounce`, `expiration`), for operators and log shippers.
//! Lines go to a file (appended) or to stdout.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// The delivery log could not be opened.
#[derive(Debug, Error)]
#[error("log.deliveryLog {path}: cannot open for appending: {source}")]
pub struct DeliveryLogError {
    path: String,
    source: std::io::Error,
}

/// A shared, line-buffered JSON-lines writer. Cloning shares the writer.
#[derive(Clone)]
pub struct DeliveryLog {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for DeliveryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryLog")
    }
}

impl DeliveryLog {
    /// Appends to `path`, or writes to stdout when `path` is None.
    pub fn open(path: Option<&Path>) -> Result<Self, DeliveryLogError> {
        let out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| DeliveryLogError {
                        path: p.display().to_string(),
                        source,
                    })?,
            ),
        };
        Ok(DeliveryLog {
            out: Arc::new(Mutex::new(out)),
        })
    }

    /// A log that discards everything (tests, benchmarks).
    pub fn discard() -> Self {
        DeliveryLog {
            out: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        }
    }

    /// Writes one event. `fields` must be a JSON object; `event` and `ts` (RFC 3339) are added.
    /// A failed write is reported in the process log, never to the SMTP client.
    pub fn record(&self, event: &str, mut fields: serde_json::Map<String, serde_json::Value>) {
        fields.insert("event".into(), event.into());
        fields.insert(
            "ts".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        let mut line = serde_json::Value::Object(fields).to_string();
        line.push('\n');
        let Ok(mut out) = self.out.lock() else {
            tracing::error!("delivery log writer poisoned; event dropped");
            return;
        };
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "delivery log write failed");
        }
    }
}
