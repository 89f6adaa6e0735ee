//! Plugin specs: the entries of a listener's plugin chain. Each entry is a struct of optional
//! fields of which exactly one is set (like a Pod volume source), so the Kubernetes schema stays
//! structural; `mailroom-plugins` builds the chain from these specs in order.

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

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
}

impl PluginSpec {
    /// Every plugin kind, as spelled in the configuration.
    pub const KINDS: &'static [&'static str] = &["access", "headers"];

    /// The kind of this entry (`"access"`, `"headers"`), or `None` unless exactly one field is
    /// set.
    pub fn kind(&self) -> Option<&'static str> {
        match self.kinds_set().as_slice() {
            [kind] => Some(*kind),
            _ => None,
        }
    }

    /// The names of the fields that are set; validation requires exactly one.
    pub(crate) fn kinds_set(&self) -> Vec<&'static str> {
        let Self { access, headers } = self; // a new field fails to compile here: add it below
        [("access", access.is_some()), ("headers", headers.is_some())]
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
