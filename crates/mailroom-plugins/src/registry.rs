//! Builds a listener's [`PluginChain`] from its declarative `plugins:` list. Every entry is
//! validated here, when the config is loaded, so a bad entry stops `mailroom check` and
//! `mailroom serve` before any mail is taken.

use std::sync::Arc;

use mailroom_config::PluginSpec;
use thiserror::Error;

use crate::builtin::{AccessPlugin, HeadersPlugin, RspamdPlugin};
use crate::{PatternError, Plugin, PluginChain};

/// What a plugin may need from its surroundings when it is built.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Name of the listener the chain belongs to (for messages).
    pub listener: String,
    /// The listener's host name (Message-ID right-hand side).
    pub hostname: String,
}

/// A plugin entry that cannot be built; `path` names the config field.
#[derive(Debug, Error)]
pub enum PluginError {
    /// The entry sets no plugin kind or more than one.
    #[error("{path}: each plugin entry must set exactly one plugin kind (access, headers, rspamd)")]
    Kind {
        /// Field path, e.g. `listeners[0].plugins[1]`.
        path: String,
    },
    /// A pattern in the entry is malformed.
    #[error("{path}: {source}")]
    Pattern {
        /// Field path of the pattern.
        path: String,
        /// What is wrong.
        source: PatternError,
    },
}

/// Builds the chain for one listener. `path` is the field path of the list (`listeners[0].plugins`).
pub fn build_chain(
    specs: &[PluginSpec],
    path: &str,
    ctx: &BuildContext,
) -> Result<PluginChain, PluginError> {
    let mut plugins: Vec<Arc<dyn Plugin>> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let entry = format!("{path}[{i}]");
        let plugin: Arc<dyn Plugin> = match (spec.kind(), spec) {
            (
                Some("access"),
                PluginSpec {
                    access: Some(access),
                    ..
                },
            ) => Arc::new(AccessPlugin::new(access, &format!("{entry}.access"))?),
            (
                Some("headers"),
                PluginSpec {
                    headers: Some(headers),
                    ..
                },
            ) => Arc::new(HeadersPlugin::new(headers, &ctx.hostname)),
            (
                Some("rspamd"),
                PluginSpec {
                    rspamd: Some(rspamd),
                    ..
                },
            ) => Arc::new(RspamdPlugin::new(rspamd)),
            _ => return Err(PluginError::Kind { path: entry }),
        };
        plugins.push(plugin);
    }
    Ok(PluginChain::new(plugins))
}
