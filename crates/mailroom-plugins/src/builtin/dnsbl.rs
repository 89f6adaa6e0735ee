//! Not built yet (stub): `dnsbl`, `dnswl`.

use async_trait::async_trait;
use mailroom_config::{DnsblPluginSpec, DnswlPluginSpec};

use crate::{Env, Plugin, PluginError};

/// `dnsbl`: Looks the client up in DNS blocklists (zones with weights); rejects or tags.
#[derive(Debug)]
pub struct DnsblPlugin {}

impl DnsblPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &DnsblPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for DnsblPlugin {
    fn name(&self) -> &'static str {
        "dnsbl"
    }
}

/// `dnswl`: Looks the client up in DNS allowlists; a listed client skips the checks after it.
#[derive(Debug)]
pub struct DnswlPlugin {}

impl DnswlPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &DnswlPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for DnswlPlugin {
    fn name(&self) -> &'static str {
        "dnswl"
    }
}
