//! Not built yet (stub): `webhook`.

use async_trait::async_trait;
use mailroom_config::WebhookPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `webhook`: Asks an HTTP(S) policy service at the chosen hooks.
#[derive(Debug)]
pub struct WebhookPlugin {}

impl WebhookPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &WebhookPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for WebhookPlugin {
    fn name(&self) -> &'static str {
        "webhook"
    }
}
