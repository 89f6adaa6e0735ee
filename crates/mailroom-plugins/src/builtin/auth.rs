//! Not built yet (stub): `spf`, `dkimVerify`, `dmarc`, `arcVerify`.

use async_trait::async_trait;
use mailroom_config::{ArcVerifyPluginSpec, DkimVerifyPluginSpec, DmarcPluginSpec, SpfPluginSpec};

use crate::{Env, Plugin, PluginError};

/// `spf`: Checks the sender with SPF (RFC 7208) and acts on the result.
#[derive(Debug)]
pub struct SpfPlugin {}

impl SpfPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &SpfPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for SpfPlugin {
    fn name(&self) -> &'static str {
        "spf"
    }
}

/// `dkimVerify`: Verifies DKIM signatures (RFC 6376) and acts on the result.
#[derive(Debug)]
pub struct DkimVerifyPlugin {}

impl DkimVerifyPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &DkimVerifyPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for DkimVerifyPlugin {
    fn name(&self) -> &'static str {
        "dkimVerify"
    }
}

/// `dmarc`: Evaluates DMARC (RFC 7489) and applies the sender domain's policy.
#[derive(Debug)]
pub struct DmarcPlugin {}

impl DmarcPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &DmarcPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for DmarcPlugin {
    fn name(&self) -> &'static str {
        "dmarc"
    }
}

/// `arcVerify`: Verifies the ARC chain (RFC 8617).
#[derive(Debug)]
pub struct ArcVerifyPlugin {}

impl ArcVerifyPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(_spec: &ArcVerifyPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {})
    }
}

#[async_trait]
impl Plugin for ArcVerifyPlugin {
    fn name(&self) -> &'static str {
        "arcVerify"
    }
}
