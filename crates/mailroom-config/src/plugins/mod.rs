//! Plugin specs: the entries of a listener's plugin chain. Each entry is a struct of optional
//! fields of which exactly one is set (like a Pod volume source), so the Kubernetes schema stays
//! structural; `mailroom-plugins` builds the chain from these specs in order.

use std::collections::BTreeMap;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;
use crate::{ByteSize, HumanDuration};

mod auth;
mod dns;
mod session;
mod shared;

pub use auth::{
    ArcVerifyPluginSpec, AuthAction, DkimVerifyPluginSpec, DmarcPluginSpec, SpfPluginSpec,
};
pub use dns::{
    DnsZoneSpec, DnsblAction, DnsblPluginSpec, DnsblRejectAt, DnswlPluginSpec, HeloCheckMode,
    HeloPluginSpec, IprevOnFail, IprevPluginSpec,
};
pub use session::{
    CatchAllSpec, EarlyTalkerPluginSpec, HttpHeaderSpec, RecipientAliasSpec, RecipientsHttpSpec,
    RecipientsPluginSpec, TarpitPluginSpec, WebhookHook, WebhookPluginSpec,
};
pub use shared::{
    GreylistPluginSpec, RateLimitCount, RateLimitKey, RateLimitPluginSpec, RateLimitSpec,
    RateWindow,
};

/// One entry of a plugin chain. Set exactly one field; its name is the plugin kind. A kind
/// written without settings (`- headers:`) uses its defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginSpec {
    /// Allow and deny lists for client addresses, HELO names, senders and recipients.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub access: Option<AccessPluginSpec>,
    /// Adds missing `Message-ID:` and `Date:` headers.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub headers: Option<HeadersPluginSpec>,
    /// Scans the message with rspamd and acts on its verdict.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub rspamd: Option<RspamdPluginSpec>,
    /// Looks the client up in DNS blocklists (zones with weights); rejects or tags.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub dnsbl: Option<DnsblPluginSpec>,
    /// Looks the client up in DNS allowlists; a listed client skips the checks after it.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub dnswl: Option<DnswlPluginSpec>,
    /// Checks forward-confirmed reverse DNS of the client (RFC 8601 `iprev`).
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub iprev: Option<IprevPluginSpec>,
    /// Checks the HELO/EHLO name: a fully qualified domain, matching the reverse DNS, not ours.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub helo: Option<HeloPluginSpec>,
    /// Checks the sender with SPF (RFC 7208) and acts on the result.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub spf: Option<SpfPluginSpec>,
    /// Verifies DKIM signatures (RFC 6376) and acts on the result.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub dkim_verify: Option<DkimVerifyPluginSpec>,
    /// Evaluates DMARC (RFC 7489) and applies the sender domain's policy.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub dmarc: Option<DmarcPluginSpec>,
    /// Verifies the ARC chain (RFC 8617).
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub arc_verify: Option<ArcVerifyPluginSpec>,
    /// Limits connections, messages and recipients per client, sender and user per window, across pods.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limit: Option<RateLimitPluginSpec>,
    /// Greylists unknown (client, sender, recipient) triplets, across pods.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub greylist: Option<GreylistPluginSpec>,
    /// Refuses clients that talk before the greeting.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub early_talker: Option<EarlyTalkerPluginSpec>,
    /// Delays the replies to suspicious clients.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub tarpit: Option<TarpitPluginSpec>,
    /// Accepts only known recipients (a list, a file or an HTTP lookup), with aliases and catch-all.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub recipients: Option<RecipientsPluginSpec>,
    /// Asks an HTTP(S) policy service at the chosen hooks.
    #[serde(
        default,
        deserialize_with = "schema::present_or_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub webhook: Option<WebhookPluginSpec>,
}

impl PluginSpec {
    /// Every plugin kind, as spelled in the configuration.
    pub const KINDS: &'static [&'static str] = &[
        "access",
        "headers",
        "rspamd",
        "dnsbl",
        "dnswl",
        "iprev",
        "helo",
        "spf",
        "dkimVerify",
        "dmarc",
        "arcVerify",
        "rateLimit",
        "greylist",
        "earlyTalker",
        "tarpit",
        "recipients",
        "webhook",
    ];

    /// The kind of this entry (`"access"`, `"headers"`), or `None` unless exactly one field is
    /// set.
    pub fn kind(&self) -> Option<&'static str> {
        match self.kinds_set().as_slice() {
            [kind] => Some(*kind),
            _ => None,
        }
    }

    /// The helper container this entry asks for in a listener's pods, if any (with the
    /// plugin's defaults filled in): the operator adds it as a sidecar. `mailroom serve` ignores
    /// it; there the helper runs wherever the plugin's URL points.
    pub fn sidecar(&self) -> Option<Sidecar> {
        let spec = self.rspamd.as_ref()?.sidecar.as_ref()?;
        Some(Sidecar {
            name: "rspamd",
            image: spec.image.clone(),
            args: spec.args.clone(),
            requests: spec.requests.clone(),
            limits: spec.limits.clone(),
            // The official image writes its state, sockets and maps here.
            writable_dirs: vec!["/var/lib/rspamd", "/run/rspamd", "/var/log/rspamd"],
        })
    }

    /// The names of the fields that are set; validation requires exactly one.
    pub(crate) fn kinds_set(&self) -> Vec<&'static str> {
        let Self {
            access,
            headers,
            rspamd,
            dnsbl,
            dnswl,
            iprev,
            helo,
            spf,
            dkim_verify,
            dmarc,
            arc_verify,
            rate_limit,
            greylist,
            early_talker,
            tarpit,
            recipients,
            webhook,
        } = self; // a new field fails to compile here: add it below
        [
            ("access", access.is_some()),
            ("headers", headers.is_some()),
            ("rspamd", rspamd.is_some()),
            ("dnsbl", dnsbl.is_some()),
            ("dnswl", dnswl.is_some()),
            ("iprev", iprev.is_some()),
            ("helo", helo.is_some()),
            ("spf", spf.is_some()),
            ("dkimVerify", dkim_verify.is_some()),
            ("dmarc", dmarc.is_some()),
            ("arcVerify", arc_verify.is_some()),
            ("rateLimit", rate_limit.is_some()),
            ("greylist", greylist.is_some()),
            ("earlyTalker", early_talker.is_some()),
            ("tarpit", tarpit.is_some()),
            ("recipients", recipients.is_some()),
            ("webhook", webhook.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, set)| set.then_some(kind))
        .collect()
    }
}

/// Allow and deny lists. A connecting client inside `allowClients` skips every deny list of
/// this plugin. Patterns are globs with `*`, compared case-insensitively: `user@example.com`,
/// `@example.com` (anyone at that domain), `*@*.example.com`, `postmaster@*`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessPluginSpec {
    /// Client networks (CIDR; a bare address means one host) exempt from this plugin's deny
    /// lists.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub allow_clients: Vec<IpNet>,
    /// Client networks rejected at connect with `554 5.7.1`.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub deny_clients: Vec<IpNet>,
    /// HELO/EHLO names rejected (globs such as `*.dynamic.example.net` or `[192.0.2.*]`).
    pub deny_helo: Vec<String>,
    /// Sender (MAIL FROM) address patterns rejected.
    pub deny_senders: Vec<String>,
    /// Recipient (RCPT TO) address patterns rejected.
    pub deny_recipients: Vec<String>,
    /// Sender address patterns exempt from `denySenders`.
    pub allow_senders: Vec<String>,
}

/// Adds headers a message lacks, as RFC 5322 expects of the first server that sees it (RFC 6409
/// section 8 for submission).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeadersPluginSpec {
    /// Add a `Message-ID:` header when the message has none. Default true.
    pub add_message_id: bool,
    /// Add a `Date:` header when the message has none. Default true.
    pub add_date: bool,
}

impl Default for HeadersPluginSpec {
    fn default() -> Self {
        Self {
            add_message_id: true,
            add_date: true,
        }
    }
}

/// Scans each message through rspamd's HTTP protocol (`POST /checkv2` on its normal worker)
/// after DATA and acts on the action rspamd chose: `reject` (554 5.7.1), `soft reject` and
/// `greylist` (451 4.7.1), `rewrite subject`, `add header` (`X-Spam: Yes`), `no action`. The
/// headers rspamd asks for (its `milter` block) are added or removed either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RspamdPluginSpec {
    /// Base URL of rspamd's normal worker, `http://host:port`. Default
    /// `http://127.0.0.1:11333` (the sidecar, when there is one).
    pub url: String,
    /// Longest wait for a verdict. Default 20s.
    pub timeout: HumanDuration,
    /// What to do when rspamd cannot be reached, times out or answers nonsense: `accept` the
    /// message unscanned (fail open, the default) or `tempfail` it with 451 4.7.1 (fail closed).
    pub on_error: FailMode,
    /// Larger messages are accepted without a scan. Default 20MiB.
    pub max_size: ByteSize,
    /// Also scan mail from authenticated (submission) clients. Default false.
    pub scan_authenticated: bool,
    /// Add `X-Rspamd-Action` and `X-Rspamd-Score` to every scanned message. Default true.
    pub add_headers: bool,
    /// Run rspamd as a helper container in each of the listener's pods (Kubernetes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
}

impl Default for RspamdPluginSpec {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:11333".to_owned(),
            timeout: HumanDuration::from_secs(20),
            on_error: FailMode::Accept,
            max_size: ByteSize::mib(20),
            scan_authenticated: false,
            add_headers: true,
            sidecar: None,
        }
    }
}

/// What a plugin does when the service it asks fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum FailMode {
    /// Continue as if the plugin had no opinion (fail open).
    #[default]
    Accept,
    /// Refuse with a temporary error, so the client retries later (fail closed).
    Tempfail,
}

/// A helper container for a plugin, run beside the server in each listener pod.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    /// Container image, e.g. `rspamd/rspamd:3.12`.
    pub image: String,
    /// Arguments of the container (default: the image's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Resource requests, e.g. `{cpu: 100m, memory: 256Mi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Resource limits, e.g. `{memory: 512Mi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// A plugin's helper container with the plugin's defaults: what the operator renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// Container name (the plugin kind).
    pub name: &'static str,
    /// Image.
    pub image: String,
    /// Arguments (empty: the image's).
    pub args: Vec<String>,
    /// Resource requests.
    pub requests: BTreeMap<String, String>,
    /// Resource limits.
    pub limits: BTreeMap<String, String>,
    /// Directories the helper writes to (empty volumes; the root filesystem is read-only).
    pub writable_dirs: Vec<&'static str>,
}
