//! Session behaviour and lookups: `earlyTalker`, `tarpit`, `recipients` and `webhook`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::Problems;

/// Refuses clients that talk before the greeting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EarlyTalkerPluginSpec {}

impl EarlyTalkerPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Delays the replies to suspicious clients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TarpitPluginSpec {}

impl TarpitPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Accepts only known recipients (a list, a file or an HTTP lookup), with aliases and catch-all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RecipientsPluginSpec {}

impl RecipientsPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}

/// Asks an HTTP(S) policy service at the chosen hooks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WebhookPluginSpec {}

impl WebhookPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, _at: &str, _p: &mut Problems) {}
}
