//! Limits shared by every inbound pod through JetStream KV: `rateLimit` and `greylist`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::Problems;

/// Limits connections, messages and recipients per client, sender and user per window, across pods.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RateLimitPluginSpec {}

impl RateLimitPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Greylists unknown (client, sender, recipient) triplets, across pods.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GreylistPluginSpec {}

impl GreylistPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}
