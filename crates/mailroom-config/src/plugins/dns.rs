//! DNS-based client checks: `dnsbl`, `dnswl`, `iprev` and `helo`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::Problems;

/// Looks the client up in DNS blocklists (zones with weights); rejects or tags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsblPluginSpec {}

impl DnsblPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Looks the client up in DNS allowlists; a listed client skips the checks after it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnswlPluginSpec {}

impl DnswlPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Checks forward-confirmed reverse DNS of the client (RFC 8601 `iprev`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IprevPluginSpec {}

impl IprevPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Checks the HELO/EHLO name: a fully qualified domain, matching the reverse DNS, not ours.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeloPluginSpec {}

impl HeloPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}
