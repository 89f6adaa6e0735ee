//! Not built yet (stub): `iprev`.

use async_trait::async_trait;
use mailroom_config::IprevPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `iprev`: Checks forward-confirmed reverse DNS of the client (RFC 8601 `iprev`).
#[derive(Debug)]
pub struct IprevPlugin {}

impl IprevPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &IprevPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for IprevPlugin {
    fn name(&self) -> &'static str {
        "iprev"
    }
}
