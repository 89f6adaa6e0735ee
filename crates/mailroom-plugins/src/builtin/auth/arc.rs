//! `arcVerify`: verifies the ARC chain (RFC 8617 section 5.2) of each message after DATA and
//! records `arc=pass (i=<sets>)`, `arc=fail (<reason>)` or `arc=none`, with
//! `smtp.remote-ip=<client>` (the property RFC 8617 registers for `arc`). Informational by
//! default: `onFail` may tag or refuse (`550 5.7.29`, the code RFC 8617 registers),
//! `onTempError` tempfail (`451 4.7.29`).

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use mail_auth::common::auth_results::AsAuthResult;
use mail_auth::{DkimResult, MessageAuthenticator};
use mailroom_config::{ArcVerifyPluginSpec, FailMode};
use prometheus::IntCounterVec;

use super::{results_counter, skips, tag, timed_out, trusted};
use crate::dns::Dns;
use crate::{Env, MessageEdits, Plugin, PluginError, SessionInfo, Transaction, Verdict};

/// Messages checked, by listener and result.
static RESULTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    results_counter(
        "arc_verify",
        "Messages the arcVerify plugin checked, by listener and result (pass, fail, none, \
         temperror, or skipped for authenticated clients).",
    )
});

/// The header a tagged message gets.
const HEADER: &str = "X-Mailroom-ARC";

/// Why `arcVerify` does not load in a build without ARC.
/// What the chain verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chain {
    /// `mail-auth`'s result: `Pass`, `None`, or why it failed.
    result: DkimResult,
    /// ARC sets in the message.
    sets: usize,
}

impl Chain {
    /// The RFC 8617 result: pass, fail or none (neutral and errors are a chain that does not
    /// validate, section 5.2), and `temperror` apart for `onTempError`.
    fn name(&self) -> &'static str {
        match &self.result {
            DkimResult::Pass => "pass",
            DkimResult::None => "none",
            DkimResult::TempError(_) => "temperror",
            DkimResult::Fail(_) | DkimResult::Neutral(_) | DkimResult::PermError(_) => "fail",
        }
    }

    /// The RFC 8601 `resinfo`.
    fn auth_result(&self, remote_ip: Option<IpAddr>) -> String {
        let mut out = String::from("arc=");
        match &self.result {
            DkimResult::Pass => out.push_str(&format!("pass (i={})", self.sets)),
            DkimResult::None => out.push_str("none"),
            DkimResult::Fail(e)
            | DkimResult::Neutral(e)
            | DkimResult::PermError(e)
            | DkimResult::TempError(e) => {
                // A chain that cannot be validated is a failed one (RFC 8617 section 5.2).
                out.push_str("fail");
                e.as_auth_result(&mut out);
            }
        }
        match remote_ip {
            Some(IpAddr::V4(ip)) => out.push_str(&format!(" smtp.remote-ip={ip}")),
            Some(IpAddr::V6(ip)) => out.push_str(&format!(" smtp.remote-ip=\"{ip}\"")),
            None => {}
        }
        out
    }
}

mod verifier {
    use super::*;
    use mail_auth::AuthenticatedMessage;

    pub(super) async fn verify(auth: &MessageAuthenticator, body: &[u8]) -> Chain {
        let Some(message) = AuthenticatedMessage::parse(body) else {
            return Chain {
                result: DkimResult::None,
                sets: 0,
            };
        };
        let output = auth.verify_arc(&message).await;
        Chain {
            result: output.result().clone(),
            sets: output.sets().len(),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use mail_auth::Error;
        use mail_auth::arc::ArcError;

        #[test]
        fn a_broken_chain_is_a_failure() {
            let broken = Chain {
                result: DkimResult::Neutral(Error::Arc(ArcError::BrokenChain)),
                sets: 1,
            };
            assert_eq!(broken.name(), "fail");
            assert_eq!(
                broken.auth_result(Some("2001:db8::1".parse().expect("ip"))),
                "arc=fail (broken ARC chain) smtp.remote-ip=\"2001:db8::1\""
            );
        }
    }
}

/// The `arcVerify` plugin.
#[derive(Debug)]
pub struct ArcVerifyPlugin {
    spec: ArcVerifyPluginSpec,
    dns: Arc<Dns>,
}

impl ArcVerifyPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &ArcVerifyPluginSpec, _path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            spec: spec.clone(),
            dns: env.dns()?,
        })
    }
}

#[async_trait]
impl Plugin for ArcVerifyPlugin {
    fn name(&self) -> &'static str {
        "arcVerify"
    }

    async fn data(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        // Only we may speak for our checks.
        edits.remove_header(HEADER);
        if skips(s, self.spec.check_authenticated) {
            RESULTS.with_label_values(&[&s.listener, "skipped"]).inc();
            return Verdict::Continue;
        }
        let chain = tokio::time::timeout(
            self.spec.timeout.as_duration(),
            verifier::verify(self.dns.authenticator(), body),
        )
        .await
        .unwrap_or_else(|_| Chain {
            result: DkimResult::TempError(timed_out()),
            sets: 0,
        });
        let remote_ip = self.spec.record_remote_ip.then(|| s.client_ip());
        edits.add_auth_result(chain.auth_result(remote_ip));
        let name = chain.name();
        RESULTS.with_label_values(&[&s.listener, name]).inc();
        tracing::debug!(listener = %s.listener, result = name, sets = chain.sets, "arcVerify");
        if trusted(s) {
            return Verdict::Continue;
        }
        match name {
            "temperror" if self.spec.on_temp_error == FailMode::Tempfail => Verdict::tempfail(
                451,
                (4, 7, 29),
                "ARC chain could not be verified now, try again later",
            ),
            "fail" if self.spec.on_fail.rejects() => {
                Verdict::reject(550, (5, 7, 29), "ARC validation failure")
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
    use mail_auth::Error;
    use mail_auth::common::crypto::CryptoError;

    #[test]
    fn results_are_recorded_as_rfc_8617_names() {
        let pass = Chain {
            result: DkimResult::Pass,
            sets: 2,
        };
        assert_eq!(
            pass.auth_result(Some("192.0.2.1".parse().expect("ip"))),
            "arc=pass (i=2) smtp.remote-ip=192.0.2.1"
        );
        let broken = Chain {
            result: DkimResult::Fail(Error::Crypto(CryptoError::FailedVerification)),
            sets: 1,
        };
        assert_eq!(broken.name(), "fail");
        assert_eq!(
            broken.auth_result(Some("2001:db8::1".parse().expect("ip"))),
            "arc=fail (verification failed) smtp.remote-ip=\"2001:db8::1\""
        );
        let none = Chain {
            result: DkimResult::None,
            sets: 0,
        };
        assert_eq!(none.auth_result(None), "arc=none");
        let temp = Chain {
            result: DkimResult::TempError(timed_out()),
            sets: 0,
        };
        assert_eq!(temp.name(), "temperror");
        assert_eq!(temp.auth_result(None), "arc=fail (dns error)");
    }
}
