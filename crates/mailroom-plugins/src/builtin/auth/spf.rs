//! `spf`: checks at MAIL FROM whether the client may send for the sender's domain (RFC 7208
//! section 2.4: the MAIL FROM identity; the HELO identity for the null sender, section 2.3).
//!
//! | result      | default                          | settings                          |
//! |-------------|----------------------------------|-----------------------------------|
//! | `fail`      | tag (RFC 7489 section 10.1)      | `fail`: reject = `550 5.7.23`     |
//! | `softfail`  | tag                              | `softfail`: reject = `550 5.7.23` |
//! | `permerror` | record                           | `onPermError`: reject = `550 5.7.24` |
//! | `temperror` | record                           | `onTempError`: tempfail = `451 4.7.24` |
//!
//! The outcome is kept as an [`SpfNote`] in the transaction (for `dmarc`) and recorded at the
//! data hook as `spf=<result> smtp.mailfrom=<domain>` (`smtp.helo=<name>` for `<>`).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfOutput, SpfResult};
use mailroom_config::{FailMode, SpfPluginSpec};
use mailroom_smtp::ReversePath;
use prometheus::IntCounterVec;

use super::{pvalue, results_counter, skips, trusted};
use crate::dns::Dns;
use crate::{Env, MessageEdits, Plugin, PluginError, SessionInfo, Suspicion, Transaction, Verdict};

/// SPF checks by listener and result.
static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    results_counter(
        "spf",
        "SPF checks of the spf plugin, by listener and result (pass, fail, softfail, neutral, \
         none, temperror, permerror, or skipped for authenticated clients).",
    )
});

/// The header a tagged message gets.
const HEADER: &str = "X-Mailroom-SPF";

/// The identity SPF checked (RFC 7208 section 2.4 and 2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpfIdentity {
    /// The MAIL FROM domain.
    MailFrom(String),
    /// The HELO name (the sender was `<>`).
    Helo(String),
}

/// Transaction note: the SPF result of this transaction's sender.
#[derive(Debug, Clone)]
pub struct SpfNote {
    /// What was checked.
    pub identity: SpfIdentity,
    /// `mail-auth`'s output: the result, the domain checked (the one DMARC aligns with), the
    /// `exp=` explanation.
    pub output: SpfOutput,
}

impl SpfNote {
    /// The RFC 8601 `resinfo`: `spf=fail smtp.mailfrom=example.org`.
    pub fn auth_result(&self) -> String {
        let result = result_name(self.output.result());
        match &self.identity {
            SpfIdentity::MailFrom(domain) => {
                format!("spf={result} smtp.mailfrom={}", pvalue(domain))
            }
            SpfIdentity::Helo(name) => format!("spf={result} smtp.helo={}", pvalue(name)),
        }
    }
}

/// The RFC 8601 name of a result.
fn result_name(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// Checks the sender of `sender` from the session's client, at most `timeout` long (then the
/// result is `temperror`).
pub(super) async fn check(
    auth: &MessageAuthenticator,
    s: &SessionInfo,
    sender: &ReversePath,
    timeout: Duration,
) -> SpfNote {
    let helo = s.helo.as_deref().unwrap_or_default();
    let (identity, mailbox) = match sender {
        ReversePath::Mailbox(m) => (SpfIdentity::MailFrom(m.domain.clone()), m.to_string()),
        ReversePath::Null => (SpfIdentity::Helo(helo.to_owned()), String::new()),
    };
    let params = if mailbox.is_empty() {
        SpfParameters::verify_ehlo(s.client_ip(), helo, &s.hostname)
    } else {
        SpfParameters::verify_mail_from(s.client_ip(), helo, &s.hostname, &mailbox)
    };
    let output = match tokio::time::timeout(timeout, auth.verify_spf(params)).await {
        Ok(output) => output,
        Err(_) => {
            let domain = match &identity {
                SpfIdentity::MailFrom(d) | SpfIdentity::Helo(d) => d.clone(),
            };
            SpfOutput::new(domain).with_result(SpfResult::TempError)
        }
    };
    SpfNote { identity, output }
}

/// What the `spf` plugin does with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Record,
    Tag,
    Reject(u16),
    TempFail,
}

/// The `spf` plugin.
#[derive(Debug)]
pub struct SpfPlugin {
    spec: SpfPluginSpec,
    dns: Arc<Dns>,
}

impl SpfPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &SpfPluginSpec, _path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            spec: spec.clone(),
            dns: env.dns()?,
        })
    }
}

/// What to do with `result`; a trusted client is never refused nor tagged.
fn act(spec: &SpfPluginSpec, result: SpfResult, trusted: bool) -> Act {
    let (action, detail) = match result {
        SpfResult::Fail => (spec.fail, 23),
        SpfResult::SoftFail => (spec.softfail, 23),
        SpfResult::PermError => (spec.on_perm_error, 24),
        SpfResult::TempError if spec.on_temp_error == FailMode::Tempfail && !trusted => {
            return Act::TempFail;
        }
        _ => return Act::Record,
    };
    if trusted {
        Act::Record
    } else if action.rejects() {
        Act::Reject(detail)
    } else if action.tags() {
        Act::Tag
    } else {
        Act::Record
    }
}

#[async_trait]
impl Plugin for SpfPlugin {
    fn name(&self) -> &'static str {
        "spf"
    }

    async fn mail(&self, s: &SessionInfo, tx: &Transaction) -> Verdict {
        if skips(s, self.spec.check_authenticated) {
            RESULTS.with_label_values(&[&s.listener, "skipped"]).inc();
            return Verdict::Continue;
        }
        let note = check(
            self.dns.authenticator(),
            s,
            &tx.sender,
            self.spec.timeout.as_duration(),
        )
        .await;
        let result = note.output.result();
        RESULTS
            .with_label_values(&[&s.listener, result_name(result)])
            .inc();
        tracing::debug!(listener = %s.listener, client = %s.client_ip(), identity = ?note.identity, result = result_name(result), "spf");
        let verdict = match act(&self.spec, result, trusted(s)) {
            Act::Record => Verdict::Continue,
            Act::Tag => {
                Suspicion::add(&s.notes, format!("spf {}", result_name(result)));
                Verdict::Continue
            }
            Act::Reject(detail) => {
                let mut text = match result {
                    SpfResult::PermError => {
                        format!("SPF record of {} is invalid", note.output.domain())
                    }
                    _ => format!(
                        "SPF check failed: {} does not allow {} to send its mail",
                        note.output.domain(),
                        s.client_ip()
                    ),
                };
                if let Some(explanation) = note.output.explanation()
                    && !explanation.is_empty()
                {
                    text = format!("{text}: {explanation}");
                }
                Verdict::reject(550, (5, 7, detail), text)
            }
            Act::TempFail => Verdict::tempfail(
                451,
                (4, 7, 24),
                "SPF check failed temporarily, try again later",
            ),
        };
        tx.notes.insert(note);
        verdict
    }

    async fn data(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        // Only we may speak for our checks.
        edits.remove_header(HEADER);
        if skips(s, self.spec.check_authenticated) {
            return Verdict::Continue;
        }
        if let Some(note) = tx.notes.get::<SpfNote>() {
            edits.add_auth_result(note.auth_result());
            let result = note.output.result();
            if act(&self.spec, result, trusted(s)) == Act::Tag {
                // The suspicion was noted at MAIL FROM already.
                edits.add_header(HEADER, result_name(result));
            }
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> SpfPluginSpec {
        serde_json::from_str(json).expect("spec")
    }

    #[test]
    fn results_map_to_actions_and_trusted_clients_are_never_refused() {
        let default = spec("{}");
        assert_eq!(act(&default, SpfResult::Fail, false), Act::Tag);
        assert_eq!(act(&default, SpfResult::SoftFail, false), Act::Tag);
        assert_eq!(act(&default, SpfResult::PermError, false), Act::Record);
        assert_eq!(act(&default, SpfResult::TempError, false), Act::Record);
        assert_eq!(act(&default, SpfResult::Pass, false), Act::Record);
        assert_eq!(act(&default, SpfResult::Neutral, false), Act::Record);

        let strict = spec(
            r#"{"fail":"reject","softfail":"reject","onPermError":"reject","onTempError":"tempfail"}"#,
        );
        assert_eq!(act(&strict, SpfResult::Fail, false), Act::Reject(23));
        assert_eq!(act(&strict, SpfResult::SoftFail, false), Act::Reject(23));
        assert_eq!(act(&strict, SpfResult::PermError, false), Act::Reject(24));
        assert_eq!(act(&strict, SpfResult::TempError, false), Act::TempFail);
        assert_eq!(act(&strict, SpfResult::None, false), Act::Record);
        for result in [
            SpfResult::Fail,
            SpfResult::SoftFail,
            SpfResult::PermError,
            SpfResult::TempError,
        ] {
            assert_eq!(act(&strict, result, true), Act::Record, "{result:?}");
        }
    }

    #[test]
    fn the_recorded_result_names_the_identity() {
        let note = SpfNote {
            identity: SpfIdentity::MailFrom("Example.org".into()),
            output: SpfOutput::new("example.org".into()).with_result(SpfResult::SoftFail),
        };
        assert_eq!(note.auth_result(), "spf=softfail smtp.mailfrom=Example.org");
        let note = SpfNote {
            identity: SpfIdentity::Helo("client (x).test".into()),
            output: SpfOutput::new("client.test".into()).with_result(SpfResult::None),
        };
        assert_eq!(note.auth_result(), "spf=none smtp.helo=clientx.test");
    }
}
