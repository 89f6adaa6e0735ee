//! Not built yet (stub): `tarpit`.

use async_trait::async_trait;
use mailroom_config::TarpitPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `tarpit`: Delays the replies to suspicious clients.
#[derive(Debug)]
pub struct TarpitPlugin {}

impl TarpitPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &TarpitPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for TarpitPlugin {
    fn name(&self) -> &'static str {
        "tarpit"
    }
}
