//! `dmarc`: evaluates DMARC (RFC 7489) after DATA and applies the `From:` domain's policy.
//!
//! The SPF result is the transaction's [`SpfNote`] (from `spf`), the DKIM results its
//! [`DkimNote`](super::DkimNote) (from `dkimVerify`); without them the plugin computes them
//! itself (and notes them). `mail-auth` finds the policy record (RFC 9989's tree walk, `t=y` lowering the policy
//! one step) and checks alignment. `mail-auth` no longer reads `pct` (RFC 9989 dropped it), so
//! the plugin reads it from the record's text and samples as RFC 7489 section 6.6.4 says: a
//! message outside the sample gets the next weaker policy.
//!
//! | result and policy   | what happens                                                   |
//! |---------------------|----------------------------------------------------------------|
//! | fail, `p=reject`    | `550 5.7.1` (with `enforce`, the default; else as quarantine)  |
//! | fail, `p=quarantine`| `X-Mailroom-DMARC: quarantine`, the client noted as suspicious |
//! | fail, `p=none`      | recorded only                                                  |
//! | temperror           | `onTempError`: accept, or `451 4.7.1`                          |
//! | pass, none, permerror | recorded only                                                |

use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::proto::rr::RData;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::{AuthenticatedMessage, DmarcOutput, DmarcResult, MessageAuthenticator};
use mailroom_config::{DmarcPluginSpec, FailMode};
use prometheus::IntCounterVec;

use super::dkim::{self, DEFAULT_MAX_SIGNATURES};
use super::spf::{self, SpfNote};
use super::{pvalue, results_counter, skips, tag, trusted};
use crate::dns::Dns;
use crate::{Env, MessageEdits, Plugin, PluginError, SessionInfo, Transaction, Verdict};

/// Messages evaluated, by listener and result.
static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    results_counter(
        "dmarc",
        "Messages the dmarc plugin evaluated, by listener and result (pass, fail, none, \
         temperror, permerror, or skipped for authenticated clients).",
    )
});

/// The header a quarantined message gets.
const HEADER: &str = "X-Mailroom-DMARC";

/// Most `_dmarc` names looked at for `pct` (RFC 9989's tree walk asks at most eight).
const MAX_WALK: usize = 8;

/// What DMARC found and what the plugin will do.
struct Evaluation {
    output: DmarcOutput,
    /// The policy to apply after `pct` sampling.
    disposition: Policy,
}

/// The `dmarc` plugin.
#[derive(Debug)]
pub struct DmarcPlugin {
    spec: DmarcPluginSpec,
    dns: Arc<Dns>,
}

impl DmarcPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &DmarcPluginSpec, _path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            spec: spec.clone(),
            dns: env.dns()?,
        })
    }

    /// Evaluates DMARC; the caller bounds the time (`timeout` only bounds the SPF and DKIM
    /// checks, so that they note a result).
    async fn evaluate(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        body: &[u8],
        timeout: Duration,
    ) -> Evaluation {
        let auth = self.dns.authenticator();
        let spf = match tx.notes.get::<SpfNote>() {
            Some(note) => note,
            None => {
                let note = spf::check(auth, s, &tx.sender, timeout).await;
                tx.notes.insert(note.clone());
                note
            }
        };
        let dkim = dkim::results(auth, tx, body, DEFAULT_MAX_SIGNATURES, timeout).await;
        let Some(message) = AuthenticatedMessage::parse(body) else {
            return Evaluation {
                output: DmarcOutput::default(),
                disposition: Policy::None,
            };
        };
        let dkim_outputs = dkim.outputs();
        let params =
            DmarcParameters::new(&message, &dkim_outputs, spf.output.domain(), &spf.output);
        let output = auth.verify_dmarc(params).await;
        let mut disposition = output.policy();
        if matches!(output.result(), DmarcResult::Fail(_))
            && matches!(disposition, Policy::Reject | Policy::Quarantine)
            && let Some(record) = output.dmarc_record()
            && !sampled(pct(auth, output.domain(), record).await)
        {
            disposition = weaker(disposition);
        }
        Evaluation {
            output,
            disposition,
        }
    }
}

/// The outcome of an evaluation that ran out of time: `temperror` for the `From:` domain.
fn timed_out(body: &[u8]) -> Evaluation {
    let domain = AuthenticatedMessage::parse(body)
        .and_then(|m| {
            m.from
                .first()
                .and_then(|from| from.rsplit_once('@'))
                .map(|(_, domain)| domain.to_ascii_lowercase())
        })
        .unwrap_or_default();
    Evaluation {
        output: DmarcOutput::default()
            .with_domain(&domain)
            .with_dkim_result(DmarcResult::TempError(super::timed_out())),
        disposition: Policy::None,
    }
}

/// The next weaker policy (RFC 7489 section 6.6.4).
fn weaker(policy: Policy) -> Policy {
    match policy {
        Policy::Reject => Policy::Quarantine,
        _ => Policy::None,
    }
}

/// Whether this message falls in the `pct` percent the policy applies to.
fn sampled(pct: u8) -> bool {
    if pct >= 100 {
        return true;
    }
    // A fresh SipHash key per call: random enough for sampling, no extra dependency.
    let draw =
        std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    draw % 100 < u64::from(pct)
}

/// The `pct` of the record `mail-auth` applied: the `_dmarc` records of `domain` and its
/// parents (cached by the resolver, `mail-auth` just asked for them) are compared with it.
/// 100 when the tag is absent or invalid (RFC 7489 section 6.3) or the record is not found.
async fn pct(auth: &MessageAuthenticator, domain: &str, applied: &Dmarc) -> u8 {
    let mut name = domain.trim_end_matches('.');
    for _ in 0..MAX_WALK {
        if let Ok(lookup) = auth.resolver().txt_lookup(format!("_dmarc.{name}.")).await {
            for record in lookup.answers() {
                let RData::TXT(txt) = &record.data else {
                    continue;
                };
                let text: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|c| c.iter().copied())
                    .collect();
                if Dmarc::parse(&text).is_ok_and(|parsed| parsed == *applied) {
                    return pct_tag(&String::from_utf8_lossy(&text));
                }
            }
        }
        match name.split_once('.') {
            Some((_, parent)) if !parent.is_empty() => name = parent,
            _ => break,
        }
    }
    100
}

/// The value of a record's `pct=` tag; 100 when absent or not a number from 0 to 100.
fn pct_tag(record: &str) -> u8 {
    record
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case("pct"))
        .and_then(|(_, value)| value.trim().parse::<u8>().ok())
        .filter(|pct| *pct <= 100)
        .unwrap_or(100)
}

fn result_name(result: &DmarcResult) -> &'static str {
    match result {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

/// The RFC 8601 `resinfo`: `dmarc=fail header.from=example.org policy.dmarc=reject`.
fn auth_result(output: &DmarcOutput) -> String {
    let result = output.result();
    let mut out = format!("dmarc={}", result_name(&result));
    if !output.domain().is_empty() {
        out.push_str(&format!(" header.from={}", pvalue(output.domain())));
    }
    if output.dmarc_record().is_some() {
        out.push_str(&format!(" policy.dmarc={}", policy_name(output.policy())));
    }
    out
}

#[async_trait]
impl Plugin for DmarcPlugin {
    fn name(&self) -> &'static str {
        "dmarc"
    }

    async fn data(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        // Only we may speak for our checks.
        edits.remove_header(HEADER);
        if skips(s, self.spec.check_authenticated) {
            RESULTS.with_label_values(&[&s.listener, "skipped"]).inc();
            return Verdict::Continue;
        }
        let timeout = self.spec.timeout.as_duration();
        let Evaluation {
            output,
            disposition,
        } = tokio::time::timeout(timeout, self.evaluate(s, tx, body, timeout))
            .await
            .unwrap_or_else(|_| timed_out(body));
        let result = output.result();
        edits.add_auth_result(auth_result(&output));
        RESULTS
            .with_label_values(&[&s.listener, result_name(&result)])
            .inc();
        tracing::debug!(listener = %s.listener, domain = output.domain(), result = result_name(&result), policy = policy_name(output.policy()), disposition = policy_name(disposition), "dmarc");
        let trusted = trusted(s);
        match result {
            DmarcResult::Fail(_) => match disposition {
                Policy::Reject if self.spec.enforce && !trusted => Verdict::reject(
                    550,
                    (5, 7, 1),
                    format!("Rejected by the DMARC policy of {}", output.domain()),
                ),
                Policy::Reject | Policy::Quarantine => {
                    tag(s, edits, HEADER, "quarantine");
                    Verdict::Continue
                }
                Policy::None | Policy::Unspecified => Verdict::Continue,
            },
            DmarcResult::TempError(_)
                if self.spec.on_temp_error == FailMode::Tempfail && !trusted =>
            {
                Verdict::tempfail(
                    451,
                    (4, 7, 1),
                    "DMARC could not be evaluated now, try again later",
                )
            }
            _ => Verdict::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pct_is_read_leniently() {
        assert_eq!(pct_tag("v=DMARC1; p=reject; pct=25"), 25);
        assert_eq!(pct_tag("v=DMARC1;p=reject;PCT = 0 ;rua=mailto:a@b"), 0);
        assert_eq!(pct_tag("v=DMARC1; p=reject"), 100);
        assert_eq!(pct_tag("v=DMARC1; p=reject; pct=250"), 100);
        assert_eq!(pct_tag("v=DMARC1; p=reject; pct=x"), 100);
    }

    #[test]
    fn sampling_honours_the_bounds_and_weakens_one_step() {
        assert!((0..200).all(|_| sampled(100)));
        assert!((0..200).all(|_| !sampled(0)));
        let half = (0..2000).filter(|_| sampled(50)).count();
        assert!((700..1300).contains(&half), "{half} of 2000 at pct=50");
        assert_eq!(weaker(Policy::Reject), Policy::Quarantine);
        assert_eq!(weaker(Policy::Quarantine), Policy::None);
    }

    #[test]
    fn the_recorded_result_has_the_domain_and_policy() {
        assert_eq!(auth_result(&DmarcOutput::default()), "dmarc=none");
        assert_eq!(
            auth_result(&DmarcOutput::default().with_domain("exa mple.org")),
            "dmarc=none header.from=example.org"
        );
    }
}
