//! Not built yet (stub): `helo`.

use async_trait::async_trait;
use mailroom_config::HeloPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `helo`: Checks the HELO/EHLO name: a fully qualified domain, matching the reverse DNS, not ours.
#[derive(Debug)]
pub struct HeloPlugin {}

impl HeloPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &HeloPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for HeloPlugin {
    fn name(&self) -> &'static str {
        "helo"
    }
}
