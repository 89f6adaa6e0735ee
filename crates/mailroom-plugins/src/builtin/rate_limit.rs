//! Not built yet (stub): `rateLimit`.

use async_trait::async_trait;
use mailroom_config::RateLimitPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `rateLimit`: Limits connections, messages and recipients per client, sender and user per window, across pods.
#[derive(Debug)]
pub struct RateLimitPlugin {}

impl RateLimitPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &RateLimitPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for RateLimitPlugin {
    fn name(&self) -> &'static str {
        "rateLimit"
    }
}
