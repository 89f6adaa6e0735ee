//! `rspamd`: scans each message with rspamd (`POST /checkv2` on its normal worker, rspamd's
//! HTTP protocol: the message as the body, the envelope in request headers) and acts on the
//! action rspamd chose. Haraka's `rspamd` plugin does the same; the mapping of actions:
//!
//! | rspamd action      | verdict                                              |
//! |--------------------|------------------------------------------------------|
//! | `reject`           | `554 5.7.1` (rspamd's `smtp_message` when it has one) |
//! | `soft reject`      | `451 4.7.1`                                          |
//! | `greylist`         | `451 4.7.1` greylisted                               |
//! | `rewrite subject`  | accept, `Subject:` replaced by rspamd's, `X-Spam: Yes` |
//! | `add header`       | accept, `X-Spam: Yes`                                |
//! | `no action`        | accept                                               |
//!
//! The headers rspamd's `milter` block asks for are added and removed in every case, and with
//! `addHeaders` the plugin adds `X-Rspamd-Action` and `X-Rspamd-Score`. A scan that fails
//! (connection refused, timeout, an answer that is not rspamd's JSON) follows `onError`: accept
//! unscanned (fail open) or `451 4.7.1` (fail closed).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::header::{CONTENT_LENGTH, HeaderValue};
use mailroom_config::{FailMode, RspamdPluginSpec};
use mailroom_smtp::{ForwardPath, ReversePath};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;

use crate::http::{HttpClient, excerpt, exchange, http_client};
use crate::{
    MAX_REPLY_TEXT, MessageEdits, Plugin, PluginError, SessionInfo, Transaction, Verdict,
    reply_text,
};

/// Scans by outcome: the rspamd action, `skipped` (too large, authenticated) or `error`.
static SCANS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_rspamd_scans_total",
                "Messages the rspamd plugin handled, by listener and outcome (the rspamd \
                 action, skipped or error).",
            ),
            &["listener", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Largest answer read from rspamd (its JSON lists every symbol; a few KiB normally).
const MAX_ANSWER: usize = 1 << 20;

/// The `rspamd` plugin.
#[derive(Debug)]
pub struct RspamdPlugin {
    client: HttpClient,
    check_url: String,
    timeout: Duration,
    on_error: FailMode,
    max_size: u64,
    scan_authenticated: bool,
    add_headers: bool,
}

/// rspamd's answer to `/checkv2`, as far as the plugin uses it.
#[derive(Debug, Deserialize)]
struct Answer {
    action: String,
    #[serde(default)]
    score: f64,
    #[serde(default)]
    required_score: f64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    messages: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    milter: Option<Milter>,
}

#[derive(Debug, Default, Deserialize)]
struct Milter {
    #[serde(default)]
    add_headers: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    remove_headers: BTreeMap<String, serde_json::Value>,
}

/// The values of one `milter.add_headers` entry: a string, `{value, order}`, or a list of those.
fn header_values(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Object(o) => o
            .get("value")
            .and_then(|v| v.as_str())
            .map(|s| vec![s.to_owned()])
            .unwrap_or_default(),
        serde_json::Value::Array(items) => items.iter().flat_map(header_values).collect(),
        _ => Vec::new(),
    }
}

/// A header field name rspamd may set: printable ASCII without `:` (RFC 5322 ftext).
fn valid_field_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// Reply text from rspamd's `smtp_message`, made safe for one SMTP reply line.
fn answer_text(answer: &Answer, default: &str) -> String {
    let text = answer
        .messages
        .get("smtp_message")
        .and_then(|v| v.as_str())
        .map(|s| reply_text(s, MAX_REPLY_TEXT))
        .unwrap_or_default();
    if text.trim().is_empty() {
        default.to_owned()
    } else {
        text
    }
}

impl RspamdPlugin {
    /// Builds the plugin from its spec (validated: `url` is an `http://` or `https://` URL);
    /// `path` is the field path of its spec, used in errors.
    pub fn new(spec: &RspamdPluginSpec, path: &str) -> Result<Self, PluginError> {
        Ok(Self {
            client: http_client(spec.timeout.as_duration()).map_err(|reason| {
                PluginError::Invalid {
                    path: format!("{path}.url"),
                    reason,
                }
            })?,
            check_url: format!("{}/checkv2", spec.url.trim_end_matches('/')),
            timeout: spec.timeout.as_duration(),
            on_error: spec.on_error,
            max_size: spec.max_size.bytes(),
            scan_authenticated: spec.scan_authenticated,
            add_headers: spec.add_headers,
        })
    }

    async fn scan(&self, s: &SessionInfo, tx: &Transaction, body: &[u8]) -> Result<Answer, String> {
        let mut request = Request::post(&self.check_url)
            .header(CONTENT_LENGTH, body.len())
            .header("IP", s.client_ip().to_string())
            .header("Pass", "all");
        let envelope = |value: String| HeaderValue::from_bytes(value.as_bytes());
        if let Some(helo) = &s.helo {
            request = request.header("Helo", envelope(helo.clone()).map_err(|e| e.to_string())?);
        }
        let from = match &tx.sender {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(m) => m.to_string(),
        };
        request = request.header("From", envelope(from).map_err(|e| e.to_string())?);
        for (to, _) in &tx.recipients {
            let rcpt = match to {
                ForwardPath::Postmaster => "postmaster".to_owned(),
                ForwardPath::Mailbox(m) => m.to_string(),
            };
            request = request.header("Rcpt", envelope(rcpt).map_err(|e| e.to_string())?);
        }
        if let Some(user) = &s.auth_user {
            request = request.header("User", envelope(user.clone()).map_err(|e| e.to_string())?);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("request: {e}"))?;
        let (status, bytes) = exchange(&self.client, request, MAX_ANSWER)
            .await
            .map_err(|e| format!("{}: {e}", self.check_url))?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", excerpt(&bytes)));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("not rspamd's JSON: {e}"))
    }

    fn act(&self, answer: &Answer, edits: &mut MessageEdits) -> Verdict {
        if let Some(milter) = &answer.milter {
            for name in milter.remove_headers.keys().filter(|n| valid_field_name(n)) {
                edits.remove_header(name.clone());
            }
            for (name, value) in milter
                .add_headers
                .iter()
                .filter(|(n, _)| valid_field_name(n))
            {
                for v in header_values(value) {
                    edits.add_header(name.clone(), v);
                }
            }
        }
        if self.add_headers {
            edits.add_header("X-Rspamd-Action", answer.action.clone());
            edits.add_header(
                "X-Rspamd-Score",
                format!("{:.2} / {:.2}", answer.score, answer.required_score),
            );
        }
        match answer.action.as_str() {
            "reject" => Verdict::reject(
                554,
                (5, 7, 1),
                answer_text(answer, "Message rejected as spam"),
            ),
            "soft reject" => Verdict::tempfail(
                451,
                (4, 7, 1),
                answer_text(answer, "Message deferred, try again later"),
            ),
            "greylist" => Verdict::tempfail(
                451,
                (4, 7, 1),
                answer_text(answer, "Greylisted, try again later"),
            ),
            "rewrite subject" => {
                if let Some(subject) = &answer.subject {
                    edits.remove_header("Subject");
                    edits.add_header("Subject", subject.clone());
                }
                edits.add_header("X-Spam", "Yes");
                Verdict::Continue
            }
            "add header" => {
                edits.add_header("X-Spam", "Yes");
                Verdict::Continue
            }
            _ => Verdict::Continue,
        }
    }
}

#[async_trait]
impl Plugin for RspamdPlugin {
    fn name(&self) -> &'static str {
        "rspamd"
    }

    async fn data(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        let too_large = u64::try_from(body.len()).unwrap_or(u64::MAX) > self.max_size;
        if too_large || (s.auth_user.is_some() && !self.scan_authenticated) {
            SCANS.with_label_values(&[&s.listener, "skipped"]).inc();
            return Verdict::Continue;
        }
        let answer = match tokio::time::timeout(self.timeout, self.scan(s, tx, body)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return self.failed(s, &e),
            Err(_) => return self.failed(s, &format!("no answer within {:?}", self.timeout)),
        };
        let outcome = match answer.action.as_str() {
            a @ ("reject" | "soft reject" | "greylist" | "rewrite subject" | "add header"
            | "no action") => a,
            _ => "other",
        };
        SCANS.with_label_values(&[&s.listener, outcome]).inc();
        tracing::debug!(listener = %s.listener, action = %answer.action, score = answer.score, "rspamd");
        self.act(&answer, edits)
    }
}

impl RspamdPlugin {
    fn failed(&self, s: &SessionInfo, error: &str) -> Verdict {
        SCANS.with_label_values(&[&s.listener, "error"]).inc();
        tracing::warn!(listener = %s.listener, error, on_error = ?self.on_error, "rspamd scan failed");
        match self.on_error {
            FailMode::Accept => Verdict::Continue,
            FailMode::Tempfail => Verdict::tempfail(
                451,
                (4, 7, 1),
                "Message could not be scanned, try again later",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> RspamdPlugin {
        RspamdPlugin::new(&RspamdPluginSpec::default(), "rspamd").expect("client")
    }

    fn answer(json: &str) -> Answer {
        serde_json::from_str(json).expect("answer JSON")
    }

    #[test]
    fn actions_map_to_verdicts_and_edits() {
        let mut edits = MessageEdits::default();
        let v = plugin().act(
            &answer(r#"{"action":"reject","score":20.1,"required_score":15,"messages":{"smtp_message":"Spam\r\n here"}}"#),
            &mut edits,
        );
        match v {
            Verdict::Reject(reply) => {
                assert_eq!(reply.code, 554);
                // CR and LF become spaces: one reply line, never a second one.
                assert!(reply.to_string().contains("Spam   here"), "{reply}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            edits
                .add_headers
                .contains(&("X-Rspamd-Score".into(), "20.10 / 15.00".into()))
        );

        let mut edits = MessageEdits::default();
        let v = plugin().act(
            &answer(r#"{"action":"rewrite subject","subject":"*** SPAM *** hi","milter":{"add_headers":{"X-Spamd-Bar":{"value":"+++","order":0},"X-Two":["a",{"value":"b"}]},"remove_headers":{"X-Spam":1}}}"#),
            &mut edits,
        );
        assert_eq!(v, Verdict::Continue);
        assert!(edits.remove_headers.contains(&"Subject".to_owned()));
        assert!(edits.remove_headers.contains(&"X-Spam".to_owned()));
        for header in [
            ("Subject", "*** SPAM *** hi"),
            ("X-Spam", "Yes"),
            ("X-Spamd-Bar", "+++"),
            ("X-Two", "a"),
            ("X-Two", "b"),
        ] {
            assert!(
                edits
                    .add_headers
                    .contains(&(header.0.into(), header.1.into())),
                "{header:?} in {edits:?}"
            );
        }

        for (action, code) in [("soft reject", 451), ("greylist", 451)] {
            let v = plugin().act(
                &answer(&format!(r#"{{"action":"{action}"}}"#)),
                &mut MessageEdits::default(),
            );
            assert!(
                matches!(v, Verdict::TempFail(ref r) if r.code == code),
                "{action}: {v:?}"
            );
        }
        let v = plugin().act(
            &answer(r#"{"action":"no action"}"#),
            &mut MessageEdits::default(),
        );
        assert_eq!(v, Verdict::Continue);
    }

    #[test]
    fn header_names_from_rspamd_are_checked() {
        let mut edits = MessageEdits::default();
        plugin().act(
            &answer(r#"{"action":"no action","milter":{"add_headers":{"Bad Name":"x","Ok":"y\r\nInjected: 1"}}}"#),
            &mut edits,
        );
        assert!(!edits.add_headers.iter().any(|(n, _)| n == "Bad Name"));
        let ok = edits
            .add_headers
            .iter()
            .find(|(n, _)| n == "Ok")
            .expect("Ok header");
        assert!(!ok.1.contains('\n'), "CR/LF folded away: {ok:?}");
    }
}
