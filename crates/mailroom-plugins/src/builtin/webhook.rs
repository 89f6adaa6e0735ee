//! `webhook`: the extension point. At the hooks it is configured for, the plugin sends the
//! session to an HTTP policy service (`POST <url>`, a JSON document) and acts on the JSON
//! answer: continue, accept, reject, defer or disconnect with the service's reply, and at the
//! data hook add the header fields it asks for. The contract (docs/plugins/webhook.md):
//!
//! ```text
//! request: {"hook": "rcpt", "listener": "smtp",
//!           "client": {"ip", "port", "helo", "tls", "authUser"},
//!           "transaction": {"sender", "recipients"} | null,
//!           "rcpt": "..." (rcpt hook), "body": "<base64>", "bodyTruncated": false (data hook,
//!           with includeBody)}
//! answer:  {"action": "continue"|"accept"|"reject"|"tempfail"|"disconnect",
//!           "code": 550, "enhanced": "5.7.1", "message": "...",
//!           "headers": [{"name": "X-Policy", "value": "..."}]}
//! ```
//!
//! A failure (no connection, timeout, HTTP status other than 2xx, an answer that breaks the
//! contract) follows `onError`: continue (fail open) or `451 4.7.1` (fail closed).
//! `https://` services are verified against the system's trusted roots ([`crate::http`]).

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, Uri};
use mailroom_config::{FailMode, WebhookPluginSpec};
use mailroom_smtp::{ForwardPath, RcptParams, ReversePath};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};
use serde::{Deserialize, Serialize};

use crate::http::{HttpClient, excerpt, exchange, http_client};
use crate::{
    Env, Hook, MAX_REPLY_TEXT, MessageEdits, Plugin, PluginError, SessionInfo, Transaction,
    Verdict, reply_text,
};

/// Requests by hook and outcome (the answer's action, or `error`).
static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_webhook_requests_total",
                "Requests of the webhook plugin, by listener, hook and outcome (the action the \
                 service answered, or error).",
            ),
            &["listener", "hook", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Largest answer read from a service (the contract's JSON is small).
const MAX_ANSWER: usize = 64 * 1024;

/// The `webhook` plugin, built from [`WebhookPluginSpec`].
#[derive(Debug)]
pub struct WebhookPlugin {
    client: HttpClient,
    url: Uri,
    hooks: Vec<&'static str>,
    timeout: Duration,
    on_error: FailMode,
    include_body: bool,
    max_body: usize,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl WebhookPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors. Reads
    /// `tokenFile` when the context loads files.
    pub fn new(spec: &WebhookPluginSpec, path: &str, env: &Env) -> Result<Self, PluginError> {
        let invalid = |field: String, reason: String| PluginError::Invalid {
            path: format!("{path}.{field}"),
            reason,
        };
        let url = spec
            .url
            .parse::<Uri>()
            .map_err(|e| invalid("url".into(), format!("{:?}: {e}", spec.url)))?;
        let mut headers = Vec::new();
        for (i, h) in spec.headers.iter().enumerate() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|e| invalid(format!("headers[{i}].name"), e.to_string()))?;
            let value = HeaderValue::from_str(&h.value)
                .map_err(|e| invalid(format!("headers[{i}].value"), e.to_string()))?;
            headers.push((name, value));
        }
        if let Some(file) = spec.token_file.as_ref().filter(|_| env.ctx.load_files) {
            let token = std::fs::read_to_string(file)
                .map_err(|e| invalid("tokenFile".into(), format!("cannot read {file}: {e}")))?;
            let token = token.trim();
            if token.is_empty() {
                return Err(invalid("tokenFile".into(), format!("{file} is empty")));
            }
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                invalid(
                    "tokenFile".into(),
                    format!("{file} holds characters not allowed in an HTTP header"),
                )
            })?;
            headers.push((AUTHORIZATION, value));
        }
        Ok(Self {
            client: http_client(spec.timeout.as_duration())
                .map_err(|reason| invalid("url".into(), reason))?,
            url,
            hooks: spec.hooks.iter().map(|h| h.as_str()).collect(),
            timeout: spec.timeout.as_duration(),
            on_error: spec.on_error,
            include_body: spec.include_body,
            max_body: usize::try_from(spec.max_body_size.bytes()).unwrap_or(usize::MAX),
            headers,
        })
    }

    fn asks_at(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook.as_str())
    }

    /// Asks the service and turns its answer into a verdict (and header fields for the data
    /// hook); every failure is reported as `onError` says.
    async fn ask(&self, s: &SessionInfo, hook: Hook, request: &WebhookRequest<'_>) -> Answered {
        let outcome = match tokio::time::timeout(self.timeout, self.post(request)).await {
            Ok(Ok(answer)) => answer.judge(hook),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        let (label, answered) = match outcome {
            Ok((label, answered)) => (label, answered),
            Err(error) => {
                tracing::warn!(listener = %s.listener, hook = hook.as_str(), %error, on_error = ?self.on_error, "webhook failed");
                let verdict = match self.on_error {
                    FailMode::Accept => Verdict::Continue,
                    FailMode::Tempfail => Verdict::tempfail(
                        451,
                        (4, 7, 1),
                        "Policy service unavailable, try again later",
                    ),
                };
                ("error", (verdict, Vec::new()))
            }
        };
        REQUESTS
            .with_label_values(&[&s.listener, hook.as_str(), label])
            .inc();
        answered
    }

    async fn post(&self, request: &WebhookRequest<'_>) -> Result<Answer, String> {
        let json = serde_json::to_vec(request).map_err(|e| format!("request: {e}"))?;
        let mut builder = Request::post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| format!("request: {e}"))?;
        let (status, body) = exchange(&self.client, request, MAX_ANSWER)
            .await
            .map_err(|e| format!("{}: {e}", self.url))?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", excerpt(&body)));
        }
        serde_json::from_slice(&body)
            .map_err(|e| format!("answer breaks the contract: {e}: {}", excerpt(&body)))
    }

    fn request<'a>(&self, s: &'a SessionInfo, hook: Hook) -> WebhookRequest<'a> {
        WebhookRequest {
            hook: hook.as_str(),
            listener: &s.listener,
            client: ClientView {
                ip: s.client_ip().to_string(),
                port: s.client.port(),
                helo: s.helo.clone(),
                tls: s.tls,
                auth_user: s.auth_user.as_deref(),
            },
            transaction: None,
            rcpt: None,
            body: None,
            body_truncated: None,
        }
    }
}

/// A verdict and the header fields to add (data hook only).
type Answered = (Verdict, Vec<(String, String)>);

/// The JSON document posted to the service.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookRequest<'a> {
    hook: &'static str,
    listener: &'a str,
    client: ClientView<'a>,
    transaction: Option<TransactionView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rcpt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_truncated: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClientView<'a> {
    ip: String,
    port: u16,
    helo: Option<String>,
    tls: bool,
    auth_user: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TransactionView {
    sender: String,
    recipients: Vec<String>,
}

fn forward_path(to: &ForwardPath) -> String {
    match to {
        ForwardPath::Postmaster => "postmaster".to_owned(),
        ForwardPath::Mailbox(m) => m.to_string(),
    }
}

impl TransactionView {
    fn of(tx: &Transaction) -> Self {
        Self {
            sender: match &tx.sender {
                ReversePath::Null => String::new(),
                ReversePath::Mailbox(m) => m.to_string(),
            },
            recipients: tx
                .recipients
                .iter()
                .map(|(to, _)| forward_path(to))
                .collect(),
        }
    }
}

/// The service's answer.
#[derive(Debug, Deserialize)]
struct Answer {
    action: Action,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    enhanced: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    headers: Vec<AnswerHeader>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Continue,
    Accept,
    Reject,
    Tempfail,
    Disconnect,
}

#[derive(Debug, Deserialize)]
struct AnswerHeader {
    name: String,
    value: String,
}

/// An RFC 5322 field name: printable ASCII without `:` (ftext).
fn valid_field_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// `class.subject.detail` (RFC 3463 §2: subject and detail of one to three digits).
fn parse_enhanced(text: &str) -> Option<(u8, u16, u16)> {
    let mut parts = text.split('.');
    let class = parts.next()?.parse::<u8>().ok()?;
    let mut number = || {
        parts
            .next()
            .filter(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
    };
    let (subject, detail) = (number()?, number()?);
    (matches!(class, 2 | 4 | 5) && parts.next().is_none()).then_some((class, subject, detail))
}

impl Answer {
    /// The verdict (and header fields) this answer asks for, with its metric label; an
    /// answer that breaks the contract is an error.
    fn judge(self, hook: Hook) -> Result<(&'static str, Answered), String> {
        let enhanced = match &self.enhanced {
            None => None,
            Some(text) => Some(
                parse_enhanced(text)
                    .ok_or_else(|| format!("enhanced {text:?} is not an enhanced status code"))?,
            ),
        };
        let mut headers = Vec::new();
        if hook == Hook::Data {
            for h in self.headers {
                if !valid_field_name(&h.name) {
                    return Err(format!("header name {:?} is not a field name", h.name));
                }
                headers.push((h.name, h.value));
            }
        }
        let text = |default: &str| {
            let text = reply_text(self.message.as_deref().unwrap_or_default(), MAX_REPLY_TEXT);
            if text.trim().is_empty() {
                default.to_owned()
            } else {
                text
            }
        };
        let verdict = match self.action {
            Action::Continue => Verdict::Continue,
            Action::Accept => Verdict::Accept,
            Action::Reject => Verdict::reject(
                self.code.unwrap_or(550),
                enhanced.unwrap_or((5, 7, 1)),
                text("Rejected by policy"),
            ),
            Action::Tempfail => Verdict::tempfail(
                self.code.unwrap_or(451),
                enhanced.unwrap_or((4, 7, 1)),
                text("Deferred by policy, try again later"),
            ),
            Action::Disconnect => {
                let code = self.code.filter(|c| (400..600).contains(c)).unwrap_or(421);
                let (_, subject, detail) = enhanced.unwrap_or((4, 7, 0));
                // The class of the enhanced code follows the reply code (RFC 3463 §3).
                let class = if code >= 500 { 5 } else { 4 };
                Verdict::disconnect(
                    code,
                    (class, subject, detail),
                    text("Closing connection by policy"),
                )
            }
        };
        Ok((verdict.label(), (verdict, headers)))
    }
}

#[async_trait]
impl Plugin for WebhookPlugin {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn connect(&self, s: &SessionInfo) -> Verdict {
        if !self.asks_at(Hook::Connect) {
            return Verdict::Continue;
        }
        self.ask(s, Hook::Connect, &self.request(s, Hook::Connect))
            .await
            .0
    }

    async fn helo(&self, s: &SessionInfo, name: &str) -> Verdict {
        if !self.asks_at(Hook::Helo) {
            return Verdict::Continue;
        }
        let mut request = self.request(s, Hook::Helo);
        request.client.helo = Some(name.to_owned());
        self.ask(s, Hook::Helo, &request).await.0
    }

    async fn mail(&self, s: &SessionInfo, tx: &Transaction) -> Verdict {
        if !self.asks_at(Hook::Mail) {
            return Verdict::Continue;
        }
        let mut request = self.request(s, Hook::Mail);
        request.transaction = Some(TransactionView::of(tx));
        self.ask(s, Hook::Mail, &request).await.0
    }

    async fn rcpt(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        to: &ForwardPath,
        _params: &RcptParams,
    ) -> Verdict {
        if !self.asks_at(Hook::Rcpt) {
            return Verdict::Continue;
        }
        let mut request = self.request(s, Hook::Rcpt);
        request.transaction = Some(TransactionView::of(tx));
        request.rcpt = Some(forward_path(to));
        self.ask(s, Hook::Rcpt, &request).await.0
    }

    async fn data(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        if !self.asks_at(Hook::Data) {
            return Verdict::Continue;
        }
        let mut request = self.request(s, Hook::Data);
        request.transaction = Some(TransactionView::of(tx));
        if self.include_body {
            let sent = &body[..body.len().min(self.max_body)];
            request.body = Some(STANDARD.encode(sent));
            request.body_truncated = Some(sent.len() < body.len());
        }
        let (verdict, headers) = self.ask(s, Hook::Data, &request).await;
        for (name, value) in headers {
            edits.add_header(name, value);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(json: &str, hook: Hook) -> Result<(&'static str, Answered), String> {
        serde_json::from_str::<Answer>(json)
            .map_err(|e| e.to_string())
            .and_then(|a| a.judge(hook))
    }

    #[test]
    fn answers_map_to_verdicts_with_codes_kept_in_their_class() {
        let (label, (v, _)) = judge(
            r#"{"action":"reject","code":554,"enhanced":"5.7.26","message":"No\r\nthanks"}"#,
            Hook::Rcpt,
        )
        .expect("valid");
        assert_eq!(label, "reject");
        assert_eq!(v, Verdict::reject(554, (5, 7, 26), "No  thanks"));
        // A code or class of the wrong kind is clamped to the action's.
        let (_, (v, _)) = judge(
            r#"{"action":"reject","code":250,"enhanced":"2.0.0"}"#,
            Hook::Mail,
        )
        .expect("valid");
        assert_eq!(v, Verdict::reject(550, (5, 0, 0), "Rejected by policy"));
        let (_, (v, _)) = judge(r#"{"action":"tempfail"}"#, Hook::Rcpt).expect("valid");
        assert!(
            matches!(v, Verdict::TempFail(ref r) if r.code == 451),
            "{v:?}"
        );
        let (_, (v, _)) = judge(r#"{"action":"disconnect","code":200}"#, Hook::Helo).expect("v");
        assert!(
            matches!(v, Verdict::Disconnect(ref r) if r.code == 421),
            "{v:?}"
        );
        let (label, (v, headers)) = judge(
            r#"{"action":"continue","headers":[{"name":"X-Policy","value":"ok"}],"extra":1}"#,
            Hook::Data,
        )
        .expect("valid");
        assert_eq!((label, v), ("continue", Verdict::Continue));
        assert_eq!(headers, [("X-Policy".to_owned(), "ok".to_owned())]);
    }

    #[test]
    fn answers_that_break_the_contract_are_errors() {
        for (json, hook) in [
            (r#"{"action":"maybe"}"#, Hook::Rcpt),
            (r#"{"code":550}"#, Hook::Rcpt),
            (r#"{"action":"reject","enhanced":"5.7"}"#, Hook::Rcpt),
            (r#"{"action":"reject","enhanced":"5.7.1234"}"#, Hook::Rcpt),
            (r#"{"action":"reject","code":70000}"#, Hook::Rcpt),
            (
                r#"{"action":"accept","headers":[{"name":"Bad Name","value":"x"}]}"#,
                Hook::Data,
            ),
            ("not json", Hook::Rcpt),
        ] {
            assert!(judge(json, hook).is_err(), "{json} accepted");
        }
        // Headers are only looked at (and added) at the data hook.
        let (_, (_, headers)) = judge(
            r#"{"action":"accept","headers":[{"name":"X-A","value":"x"}]}"#,
            Hook::Rcpt,
        )
        .expect("valid");
        assert!(headers.is_empty());
    }
}
