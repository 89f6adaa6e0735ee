//! Not built yet (stub): `earlyTalker`.

use async_trait::async_trait;
use mailroom_config::EarlyTalkerPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `earlyTalker`: Refuses clients that talk before the greeting.
#[derive(Debug)]
pub struct EarlyTalkerPlugin {}

impl EarlyTalkerPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(
        _spec: &EarlyTalkerPluginSpec,
        _path: &str,
        _env: &Env,
    ) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for EarlyTalkerPlugin {
    fn name(&self) -> &'static str {
        "earlyTalker"
    }
}
