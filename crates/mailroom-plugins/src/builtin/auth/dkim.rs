//! `dkimVerify`: verifies the DKIM signatures (RFC 6376) of each message after DATA and
//! records one result per signature, `dkim=none` for an unsigned message.
//!
//! At most `maxSignatures` are verified, from the top (RFC 6376 section 6.1 lets a verifier
//! limit them). A body that does not match its signature's `bh=` is a `fail` (RFC 6376
//! section 6.1.3: PERMFAIL, "body hash did not verify"). When no signature passes, `onFail`
//! acts on a failed one (`550 5.7.20`, RFC 7372) and `onTempError` on a key that could not be
//! fetched (`451 4.7.20`). The results are kept as a [`DkimNote`] for `dmarc`.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use mail_auth::common::auth_results::AsAuthResult;
use mail_auth::dkim::{DkimError, Signature};
use mail_auth::{AuthenticatedMessage, DkimOutput, DkimResult, Error, MessageAuthenticator};
use mailroom_config::{DkimVerifyPluginSpec, FailMode};
use prometheus::IntCounterVec;

use super::{pvalue, results_counter, skips, tag, timed_out, trusted};
use crate::dns::Dns;
use crate::{Env, MessageEdits, Plugin, PluginError, SessionInfo, Transaction, Verdict};

/// Messages checked, by listener and overall result.
static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    results_counter(
        "dkim_verify",
        "Messages the dkimVerify plugin checked, by listener and overall result (pass when a \
         signature passed, else fail, temperror, permerror, neutral or none; skipped for \
         authenticated clients).",
    )
});

/// The header a tagged message gets.
const HEADER: &str = "X-Mailroom-DKIM";

/// Signatures `dmarc` verifies when it has to verify them itself.
pub(super) const DEFAULT_MAX_SIGNATURES: usize = 5;

/// The result of one signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSignatureResult {
    /// The verification result.
    pub result: DkimResult,
    /// The signature, when its header could be parsed.
    pub signature: Option<Signature>,
}

impl DkimSignatureResult {
    /// The RFC 8601 `resinfo`: `dkim=pass header.d=example.org header.s=sel header.b=AbCdEfGh`.
    pub fn auth_result(&self) -> String {
        let mut out = String::from("dkim=");
        self.result.as_auth_result(&mut out);
        if let Some(sig) = &self.signature {
            out.push_str(&format!(
                " header.d={} header.s={}",
                pvalue(&sig.d),
                pvalue(&sig.s)
            ));
            if let Some(prefix) = sig.b.get(..6) {
                out.push_str(" header.b=");
                out.push_str(&base64(prefix));
            }
        }
        out
    }
}

/// Transaction note: the DKIM results of this transaction's message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DkimNote {
    /// One result per signature verified, in header order; empty when the message is unsigned.
    pub signatures: Vec<DkimSignatureResult>,
}

impl DkimNote {
    /// The results as `mail-auth` outputs, for DMARC.
    pub fn outputs(&self) -> Vec<DkimOutput<'_>> {
        self.signatures
            .iter()
            .filter_map(|s| {
                let output = match &s.result {
                    DkimResult::Pass => DkimOutput::pass(),
                    DkimResult::Fail(e) => DkimOutput::fail(e.clone()),
                    DkimResult::Neutral(e) => DkimOutput::neutral(e.clone()),
                    DkimResult::PermError(e) => DkimOutput::perm_err(e.clone()),
                    DkimResult::TempError(e) => DkimOutput::temp_err(e.clone()),
                    DkimResult::None => return None,
                };
                Some(match &s.signature {
                    Some(signature) => output.with_signature(signature),
                    None => output,
                })
            })
            .collect()
    }

    /// The message's overall result: `pass` when a signature passed, else the first of fail,
    /// temperror, permerror, neutral found; `none` when unsigned.
    pub fn summary(&self) -> &'static str {
        let has = |f: fn(&DkimResult) -> bool| self.signatures.iter().any(|s| f(&s.result));
        if has(|r| matches!(r, DkimResult::Pass)) {
            "pass"
        } else if has(|r| matches!(r, DkimResult::Fail(_))) {
            "fail"
        } else if has(|r| matches!(r, DkimResult::TempError(_))) {
            "temperror"
        } else if has(|r| matches!(r, DkimResult::PermError(_))) {
            "permerror"
        } else if has(|r| matches!(r, DkimResult::Neutral(_))) {
            "neutral"
        } else {
            "none"
        }
    }
}

/// The DKIM results of `body`: the transaction's [`DkimNote`] when a plugin verified it
/// already, else verified now (at most `max` signatures, at most `timeout` long) and noted.
pub(super) async fn results(
    auth: &MessageAuthenticator,
    tx: &Transaction,
    body: &[u8],
    max: usize,
    timeout: Duration,
) -> DkimNote {
    if let Some(note) = tx.notes.get::<DkimNote>() {
        return note;
    }
    let note = match tokio::time::timeout(timeout, verify(auth, body, max)).await {
        Ok(note) => note,
        Err(_) => DkimNote {
            signatures: vec![DkimSignatureResult {
                result: DkimResult::TempError(timed_out()),
                signature: None,
            }],
        },
    };
    tx.notes.insert(note.clone());
    note
}

async fn verify(auth: &MessageAuthenticator, body: &[u8], max: usize) -> DkimNote {
    let Some(mut message) = AuthenticatedMessage::parse(body) else {
        return DkimNote::default();
    };
    message.dkim_headers.truncate(max);
    let signatures = auth
        .verify_dkim(&message)
        .await
        .into_iter()
        .take(max)
        .map(|output| DkimSignatureResult {
            result: body_hash_is_fail(output.result().clone()),
            signature: output.signature().cloned(),
        })
        .collect();
    DkimNote { signatures }
}

/// `mail-auth` reports a body hash mismatch as neutral; RFC 6376 section 6.1.3 makes it a
/// PERMFAIL, which RFC 8601 section 2.7.1 records as `fail`.
fn body_hash_is_fail(result: DkimResult) -> DkimResult {
    match result {
        DkimResult::Neutral(e @ Error::Dkim(DkimError::FailedBodyHashMatch)) => DkimResult::Fail(e),
        other => other,
    }
}

/// Base64 (RFC 4648, no padding needed for a multiple of 3 bytes) of a short value: the
/// `header.b` prefix.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
        for _ in chunk.len()..3 {
            out.push('=');
        }
    }
    out
}

/// The `dkimVerify` plugin.
#[derive(Debug)]
pub struct DkimVerifyPlugin {
    spec: DkimVerifyPluginSpec,
    dns: Arc<Dns>,
}

impl DkimVerifyPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &DkimVerifyPluginSpec, _path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            spec: spec.clone(),
            dns: env.dns()?,
        })
    }
}

#[async_trait]
impl Plugin for DkimVerifyPlugin {
    fn name(&self) -> &'static str {
        "dkimVerify"
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
        let max = usize::try_from(self.spec.max_signatures).unwrap_or(DEFAULT_MAX_SIGNATURES);
        let note = results(
            self.dns.authenticator(),
            tx,
            body,
            max,
            self.spec.timeout.as_duration(),
        )
        .await;
        if note.signatures.is_empty() {
            edits.add_auth_result("dkim=none");
        }
        for signature in &note.signatures {
            edits.add_auth_result(signature.auth_result());
        }
        let summary = note.summary();
        RESULTS.with_label_values(&[&s.listener, summary]).inc();
        tracing::debug!(listener = %s.listener, result = summary, signatures = note.signatures.len(), "dkimVerify");
        if trusted(s) {
            return Verdict::Continue;
        }
        let has_temp_error = note
            .signatures
            .iter()
            .any(|sig| matches!(sig.result, DkimResult::TempError(_)));
        match summary {
            "pass" => Verdict::Continue,
            _ if has_temp_error && self.spec.on_temp_error == FailMode::Tempfail => {
                Verdict::tempfail(
                    451,
                    (4, 7, 20),
                    "DKIM signature could not be verified now, try again later",
                )
            }
            "fail" if self.spec.on_fail.rejects() => {
                Verdict::reject(550, (5, 7, 20), "No passing DKIM signature found")
            }
            "fail" if self.spec.on_fail.tags() => {
                tag(s, edits, HEADER, "fail");
                Verdict::Continue
            }
            _ => Verdict::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(d: &str, b: &[u8]) -> Option<Signature> {
        Some(Signature {
            d: d.into(),
            s: "sel".into(),
            b: b.to_vec(),
            ..Signature::default()
        })
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xfe, 0, 1, 2]), "+//+AAEC");
    }

    #[test]
    fn each_signature_is_recorded_with_domain_selector_and_b_prefix() {
        let pass = DkimSignatureResult {
            result: DkimResult::Pass,
            signature: sig("example.org", b"foobar and more"),
        };
        assert_eq!(
            pass.auth_result(),
            "dkim=pass header.d=example.org header.s=sel header.b=Zm9vYmFy"
        );
        let body = DkimSignatureResult {
            result: body_hash_is_fail(DkimResult::Neutral(Error::Dkim(
                DkimError::FailedBodyHashMatch,
            ))),
            signature: sig("ex;ample.org", b"abc"),
        };
        assert_eq!(
            body.auth_result(),
            "dkim=fail (body hash did not verify) header.d=example.org header.s=sel"
        );
    }

    #[test]
    fn the_summary_prefers_pass_then_fail() {
        let of = |results: Vec<DkimResult>| DkimNote {
            signatures: results
                .into_iter()
                .map(|result| DkimSignatureResult {
                    result,
                    signature: None,
                })
                .collect(),
        };
        let fail = || {
            DkimResult::Fail(Error::Crypto(
                mail_auth::common::crypto::CryptoError::FailedVerification,
            ))
        };
        assert_eq!(of(vec![]).summary(), "none");
        assert_eq!(of(vec![fail(), DkimResult::Pass]).summary(), "pass");
        assert_eq!(
            of(vec![DkimResult::TempError(timed_out()), fail()]).summary(),
            "fail"
        );
        assert_eq!(
            of(vec![DkimResult::TempError(timed_out())]).summary(),
            "temperror"
        );
        let note = of(vec![fail(), DkimResult::Pass, DkimResult::None]);
        let outputs = note.outputs();
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[1].result(), &DkimResult::Pass);
    }
}
