//! Sender authentication with `mail-auth`: `spf`, `dkimVerify`, `dmarc` and `arcVerify`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::Problems;

/// Checks the sender with SPF (RFC 7208) and acts on the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SpfPluginSpec {}

impl SpfPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Verifies DKIM signatures (RFC 6376) and acts on the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DkimVerifyPluginSpec {}

impl DkimVerifyPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Evaluates DMARC (RFC 7489) and applies the sender domain's policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DmarcPluginSpec {}

impl DmarcPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Verifies the ARC chain (RFC 8617).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ArcVerifyPluginSpec {}

impl ArcVerifyPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}
