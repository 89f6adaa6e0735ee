//! Not built yet (stub): `recipients`.

use async_trait::async_trait;
use mailroom_config::RecipientsPluginSpec;

use crate::{Env, Plugin, PluginError};

/// `recipients`: Accepts only known recipients (a list, a file or an HTTP lookup), with aliases and catch-all.
#[derive(Debug)]
pub struct RecipientsPlugin {}

impl RecipientsPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &RecipientsPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for RecipientsPlugin {
    fn name(&self) -> &'static str {
        "recipients"
    }
}
