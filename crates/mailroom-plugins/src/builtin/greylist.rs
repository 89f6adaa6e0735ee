//! Not built yet (stub): `greylist`.

use async_trait::async_trait;
use mailroom_config::GreylistPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `greylist`: Greylists unknown (client, sender, recipient) triplets, across pods.
#[derive(Debug)]
pub struct GreylistPlugin {}

impl GreylistPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &GreylistPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for GreylistPlugin {
    fn name(&self) -> &'static str {
        "greylist"
    }
}
