//! Sender authentication with `mail-auth`: `spf`, `dkimVerify`, `dmarc` and `arcVerify`.
//!
//! Every kind records its result in the message's one `Authentication-Results:` field (RFC 8601)
//! and then acts on it as its settings say: [`AuthAction`] for a failed check, [`FailMode`] for
//! a DNS failure or timeout. Each has defaults that follow the RFCs, so a bare `- spf:` is a
//! sensible configuration.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::HumanDuration;
use crate::plugins::FailMode;
use crate::validate::Problems;

/// Default longest time for the DNS work of one check.
const DEFAULT_TIMEOUT: HumanDuration = HumanDuration::from_secs(10);
/// Longest `timeout` accepted: the client waits for the reply meanwhile.
const MAX_TIMEOUT_SECS: u64 = 300;
/// Default and largest `dkimVerify.maxSignatures`.
const DEFAULT_MAX_SIGNATURES: u32 = 5;
const MAX_SIGNATURES: u32 = 50;

/// What a check does with a message whose result it dislikes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum AuthAction {
    /// Record the result in `Authentication-Results` only.
    #[default]
    Accept,
    /// Also mark the message with an `X-Mailroom-<check>:` header and note the client as
    /// suspicious (for `tarpit`).
    Tag,
    /// Refuse it with a permanent error (5xx).
    Reject,
}

impl AuthAction {
    /// Whether the message is refused.
    pub fn rejects(self) -> bool {
        self == AuthAction::Reject
    }

    /// Whether the message is tagged (header and suspicion).
    pub fn tags(self) -> bool {
        self == AuthAction::Tag
    }
}

/// Checks the sender with SPF (RFC 7208) at `MAIL FROM`: the MAIL FROM domain, or the HELO
/// name for the null sender `<>`. The result is recorded as `spf=<result>
/// smtp.mailfrom=<domain>` (or `smtp.helo=<name>`) and kept for `dmarc`. Authenticated clients
/// are not checked; trusted ones (`dnswl`) are checked but never refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SpfPluginSpec {
    /// What to do on `fail` (the domain says the client may not send for it): `accept`,
    /// `tag` (the default: RFC 7489 section 10.1 lets DMARC decide) or `reject` with
    /// `550 5.7.23` at MAIL FROM.
    pub fail: AuthAction,
    /// What to do on `softfail` (`~all`: probably not allowed): `accept`, `tag` (the
    /// default) or `reject` with `550 5.7.23`.
    pub softfail: AuthAction,
    /// What to do on `permerror` (a broken SPF record): `accept` (the default), `tag` or
    /// `reject` with `550 5.7.24`.
    pub on_perm_error: AuthAction,
    /// What to do on `temperror` (DNS failure or timeout): `accept` (the default) or
    /// `tempfail` with `451 4.7.24`.
    pub on_temp_error: FailMode,
    /// Also check clients that authenticated (submission). Default false.
    pub check_authenticated: bool,
    /// Longest time for the DNS lookups of one check; a check that takes longer is a
    /// `temperror`. Default 10s.
    pub timeout: HumanDuration,
}

impl Default for SpfPluginSpec {
    fn default() -> Self {
        Self {
            fail: AuthAction::Tag,
            softfail: AuthAction::Tag,
            on_perm_error: AuthAction::Accept,
            on_temp_error: FailMode::Accept,
            check_authenticated: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl SpfPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_timeout(self.timeout, at, p);
    }
}

/// Verifies the DKIM signatures (RFC 6376) of each message after DATA and records one
/// `dkim=<result> header.d=<domain> header.s=<selector> header.b=<first 8 characters of b=>`
/// per signature (`dkim=none` when the message is unsigned); the results are kept for
/// `dmarc`. Authenticated clients are not checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DkimVerifyPluginSpec {
    /// What to do when no signature passes and at least one fails: `accept` (the default:
    /// only recorded), `tag` or `reject` with `550 5.7.20`.
    pub on_fail: AuthAction,
    /// What to do when no signature passes and a key could not be fetched (DNS failure or
    /// timeout): `accept` (the default) or `tempfail` with `451 4.7.20`.
    pub on_temp_error: FailMode,
    /// Signatures verified per message, from the top; the others are ignored. 1 to 50,
    /// default 5.
    pub max_signatures: u32,
    /// Also check clients that authenticated (submission). Default false.
    pub check_authenticated: bool,
    /// Longest time for the key lookups of one message; a message that takes longer gets
    /// `temperror`. Default 10s.
    pub timeout: HumanDuration,
}

impl Default for DkimVerifyPluginSpec {
    fn default() -> Self {
        Self {
            on_fail: AuthAction::Accept,
            on_temp_error: FailMode::Accept,
            max_signatures: DEFAULT_MAX_SIGNATURES,
            check_authenticated: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl DkimVerifyPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_timeout(self.timeout, at, p);
        p.range(
            format!("{at}.maxSignatures"),
            u64::from(self.max_signatures),
            1..=u64::from(MAX_SIGNATURES),
        );
    }
}

/// Evaluates DMARC (RFC 7489) after DATA from the SPF and DKIM results (those of the `spf` and
/// `dkimVerify` plugins when the chain has them, else its own) and applies the policy of the
/// `From:` domain, honouring `pct` and `t=y`: `p=reject` refuses the message with `550 5.7.1`,
/// `p=quarantine` adds `X-Mailroom-DMARC: quarantine`, `p=none` only records
/// `dmarc=<result> header.from=<domain> policy.dmarc=<policy>`. Authenticated clients are not
/// checked; trusted ones (`dnswl`) are never refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DmarcPluginSpec {
    /// Refuse messages that fail DMARC when the domain asks for `p=reject`. Default true;
    /// with false they are quarantined (tagged) instead.
    pub enforce: bool,
    /// What to do when DMARC cannot be evaluated now (DNS failure or timeout): `accept` (the
    /// default) or `tempfail` with `451 4.7.1`.
    pub on_temp_error: FailMode,
    /// Also check clients that authenticated (submission). Default false.
    pub check_authenticated: bool,
    /// Longest time for the DNS lookups of one message (its own SPF and DKIM checks
    /// included); a message that takes longer gets `temperror`. Default 10s.
    pub timeout: HumanDuration,
}

impl Default for DmarcPluginSpec {
    fn default() -> Self {
        Self {
            enforce: true,
            on_temp_error: FailMode::Accept,
            check_authenticated: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl DmarcPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_timeout(self.timeout, at, p);
    }
}

/// Verifies the ARC chain (RFC 8617) of each message after DATA and records
/// `arc=pass|fail|none`. Informational by default. Authenticated clients are not checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ArcVerifyPluginSpec {
    /// What to do with a broken chain (`arc=fail`): `accept` (the default: only recorded),
    /// `tag` or `reject` with `550 5.7.29`.
    pub on_fail: AuthAction,
    /// What to do when a key could not be fetched (DNS failure or timeout): `accept` (the
    /// default) or `tempfail` with `451 4.7.29`.
    pub on_temp_error: FailMode,
    /// Add `smtp.remote-ip=<client address>` to the result (the property RFC 8617 registers
    /// for `arc`). Default true.
    pub record_remote_ip: bool,
    /// Also check clients that authenticated (submission). Default false.
    pub check_authenticated: bool,
    /// Longest time for the key lookups of one message. Default 10s.
    pub timeout: HumanDuration,
}

impl Default for ArcVerifyPluginSpec {
    fn default() -> Self {
        Self {
            on_fail: AuthAction::Accept,
            on_temp_error: FailMode::Accept,
            record_remote_ip: true,
            check_authenticated: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl ArcVerifyPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_timeout(self.timeout, at, p);
    }
}

fn check_timeout(timeout: HumanDuration, at: &str, p: &mut Problems) {
    let at = format!("{at}.timeout");
    if timeout.is_zero() {
        p.push(at, "must be longer than 0s");
    } else if timeout.as_duration().as_secs() > MAX_TIMEOUT_SECS {
        p.push(
            at,
            format!("{timeout} is too long: at most 5m (the client waits meanwhile)"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load_str;

    fn listener(plugins: &str) -> String {
        format!(
            "listeners:\n- name: mx\n  address: 127.0.0.1:2525\n  acceptedDomains: [example.test]\n  plugins:\n{plugins}"
        )
    }

    fn plugins(yaml: &str) -> Vec<crate::PluginSpec> {
        load_str(&listener(yaml), "t.yaml")
            .unwrap_or_else(|e| panic!("{e}"))
            .listeners
            .remove(0)
            .plugins
    }

    fn problems(yaml: &str) -> Vec<(String, String)> {
        match load_str(&listener(yaml), "t.yaml") {
            Ok(c) => panic!("unexpectedly valid: {:?}", c.listeners[0].plugins),
            Err(e) => e
                .problems
                .into_iter()
                .map(|p| (p.path, p.message))
                .collect(),
        }
    }

    #[test]
    fn bare_kinds_get_the_documented_defaults() {
        let specs = plugins("  - spf:\n  - dkimVerify:\n  - dmarc:\n  - arcVerify:\n");
        let spf = specs[0].spf.clone().expect("spf");
        assert_eq!(spf, SpfPluginSpec::default());
        assert_eq!(spf.fail, AuthAction::Tag);
        assert_eq!(spf.softfail, AuthAction::Tag);
        assert_eq!(spf.on_perm_error, AuthAction::Accept);
        assert_eq!(spf.on_temp_error, FailMode::Accept);
        assert!(!spf.check_authenticated);
        assert_eq!(spf.timeout, HumanDuration::from_secs(10));

        let dkim = specs[1].dkim_verify.clone().expect("dkimVerify");
        assert_eq!(dkim, DkimVerifyPluginSpec::default());
        assert_eq!(dkim.on_fail, AuthAction::Accept);
        assert_eq!(dkim.max_signatures, 5);

        let dmarc = specs[2].dmarc.clone().expect("dmarc");
        assert_eq!(dmarc, DmarcPluginSpec::default());
        assert!(dmarc.enforce);

        let arc = specs[3].arc_verify.clone().expect("arcVerify");
        assert_eq!(arc, ArcVerifyPluginSpec::default());
        assert!(arc.record_remote_ip);
        assert_eq!(arc.on_fail, AuthAction::Accept);
    }

    #[test]
    fn settings_are_read_in_camel_case() {
        let specs = plugins(
            "  - spf: {fail: reject, softfail: accept, onPermError: reject, onTempError: tempfail, checkAuthenticated: true, timeout: 3s}\n\
             \x20 - dkimVerify: {onFail: tag, onTempError: tempfail, maxSignatures: 2}\n\
             \x20 - dmarc: {enforce: false, onTempError: tempfail, timeout: 500ms}\n\
             \x20 - arcVerify: {onFail: reject, recordRemoteIp: false}\n",
        );
        let spf = specs[0].spf.clone().expect("spf");
        assert!(spf.fail.rejects() && !spf.fail.tags());
        assert_eq!(spf.softfail, AuthAction::Accept);
        assert!(spf.on_perm_error.rejects());
        assert_eq!(spf.on_temp_error, FailMode::Tempfail);
        assert!(spf.check_authenticated);
        assert_eq!(spf.timeout, HumanDuration::from_secs(3));
        let dkim = specs[1].dkim_verify.clone().expect("dkimVerify");
        assert!(dkim.on_fail.tags());
        assert_eq!(dkim.max_signatures, 2);
        let dmarc = specs[2].dmarc.clone().expect("dmarc");
        assert!(!dmarc.enforce);
        assert_eq!(dmarc.timeout, HumanDuration::from_millis(500));
        let arc = specs[3].arc_verify.clone().expect("arcVerify");
        assert!(arc.on_fail.rejects() && !arc.record_remote_ip);
    }

    #[test]
    fn bad_values_name_their_fields() {
        let found = problems(
            "  - spf: {timeout: 0s}\n  - dkimVerify: {maxSignatures: 0}\n  - dmarc: {timeout: 1h}\n  - arcVerify: {timeout: 0ms}\n  - dkimVerify: {maxSignatures: 51}\n",
        );
        let expect = [
            ("listeners[0].plugins[0].spf.timeout", "longer than 0s"),
            (
                "listeners[0].plugins[1].dkimVerify.maxSignatures",
                "expected 1 to 50",
            ),
            ("listeners[0].plugins[2].dmarc.timeout", "too long"),
            (
                "listeners[0].plugins[3].arcVerify.timeout",
                "longer than 0s",
            ),
            (
                "listeners[0].plugins[4].dkimVerify.maxSignatures",
                "51 is out of range",
            ),
        ];
        for (path, needle) in expect {
            assert!(
                found.iter().any(|(p, m)| p == path && m.contains(needle)),
                "no {path:?} with {needle:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    #[test]
    fn unknown_actions_and_fields_are_refused() {
        for yaml in [
            "  - spf: {fail: quarantine}\n",
            "  - dkimVerify: {onTempError: reject}\n",
            "  - dmarc: {pct: 50}\n",
        ] {
            assert!(load_str(&listener(yaml), "t.yaml").is_err(), "{yaml}");
        }
    }

    #[test]
    fn the_schema_lists_the_actions_as_plain_strings() {
        let schema = serde_json::to_value(schemars::schema_for!(SpfPluginSpec)).expect("json");
        let text = schema.to_string();
        assert!(
            text.contains(r#""enum":["accept","tag","reject"]"#),
            "{text}"
        );
    }
}
