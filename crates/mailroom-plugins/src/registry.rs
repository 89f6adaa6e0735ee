//! Builds a listener's [`PluginChain`] from its declarative `plugins:` list. Every entry is
//! validated here, when the config is loaded, so a bad entry stops `mailroom check` and
//! `mailroom serve` before any mail is taken.

use std::sync::{Arc, OnceLock};

use mailroom_config::{DnsSpec, PluginSpec};
use thiserror::Error;

use crate::builtin;
use crate::dns::Dns;
use crate::{PatternError, Plugin, PluginChain};

/// What a plugin may need from its surroundings when it is built.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Name of the listener the chain belongs to (for messages).
    pub listener: String,
    /// The listener's host name (Message-ID right-hand side, authserv-id).
    pub hostname: String,
    /// The listener's DNS settings (`listeners[].dns`).
    pub dns: DnsSpec,
    /// Where state shared by every inbound process lives (rate limits, greylist): the
    /// cluster queue's JetStream. `None` (the local queue, `mailroom check`): in this process.
    pub shared: Option<SharedBackend>,
    /// Whether plugins read the files their specs name (lists, keys) while being built. The
    /// operator validates specs whose files exist only inside the pods: it sets false.
    pub load_files: bool,
}

impl BuildContext {
    /// A context for `listener` with default DNS and no shared backend.
    pub fn new(listener: impl Into<String>, hostname: impl Into<String>) -> Self {
        Self {
            listener: listener.into(),
            hostname: hostname.into(),
            dns: DnsSpec::default(),
            shared: None,
            load_files: true,
        }
    }
}

/// The JetStream that holds state shared across inbound processes.
#[derive(Clone)]
pub struct SharedBackend {
    /// The JetStream context of the queue's connection.
    pub jetstream: async_nats::jetstream::Context,
    /// The queue's stream name; shared buckets are named after it (`<stream>_RATELIMIT`).
    pub stream: String,
    /// Replicas of the buckets.
    pub replicas: usize,
}

impl std::fmt::Debug for SharedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBackend")
            .field("stream", &self.stream)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// What a plugin constructor gets: the build context and the chain's one resolver, made on
/// first use.
#[derive(Debug)]
pub struct Env<'a> {
    /// The build context.
    pub ctx: &'a BuildContext,
    /// Field path of the chain's `dns` settings, for errors.
    dns_path: String,
    dns: OnceLock<Arc<Dns>>,
}

impl Env<'_> {
    /// The chain's resolver (built once, shared by its plugins).
    pub fn dns(&self) -> Result<Arc<Dns>, PluginError> {
        if let Some(dns) = self.dns.get() {
            return Ok(Arc::clone(dns));
        }
        let dns = Arc::new(
            Dns::new(&self.ctx.dns).map_err(|reason| PluginError::Invalid {
                path: self.dns_path.clone(),
                reason,
            })?,
        );
        Ok(Arc::clone(self.dns.get_or_init(|| dns)))
    }
}

/// A plugin entry that cannot be built; `path` names the config field.
#[derive(Debug, Error)]
pub enum PluginError {
    /// The entry sets no plugin kind or more than one.
    #[error("{path}: each plugin entry must set exactly one plugin kind (one of: {kinds})", kinds = PluginSpec::KINDS.join(", "))]
    Kind {
        /// Field path, e.g. `listeners[0].plugins[1]`.
        path: String,
    },
    /// A pattern in the entry is malformed.
    #[error("{path}: {source}")]
    Pattern {
        /// Field path of the pattern.
        path: String,
        /// What is wrong.
        source: PatternError,
    },
    /// A setting cannot be used (a file that does not load, a resolver that cannot start).
    #[error("{path}: {reason}")]
    Invalid {
        /// Field path of the setting.
        path: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

impl PluginError {
    /// The field path the error is about.
    pub fn path(&self) -> &str {
        match self {
            PluginError::Kind { path }
            | PluginError::Pattern { path, .. }
            | PluginError::Invalid { path, .. } => path,
        }
    }

    /// What is wrong, without the path.
    pub fn reason(&self) -> String {
        let text = self.to_string();
        text.strip_prefix(self.path())
            .and_then(|rest| rest.strip_prefix(": "))
            .map_or_else(|| text.clone(), str::to_owned)
    }
}

/// Builds the chain for one listener. `path` is the field path of the list (`listeners[0].plugins`).
pub fn build_chain(
    specs: &[PluginSpec],
    path: &str,
    ctx: &BuildContext,
) -> Result<PluginChain, PluginError> {
    let env = Env {
        ctx,
        dns_path: format!("{}.dns", path.strip_suffix(".plugins").unwrap_or(path)),
        dns: OnceLock::new(),
    };
    let plugins = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| build_one(spec, &format!("{path}[{i}]"), &env))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PluginChain::new(plugins))
}

fn build_one(spec: &PluginSpec, entry: &str, env: &Env) -> Result<Arc<dyn Plugin>, PluginError> {
    let Some(kind) = spec.kind() else {
        return Err(PluginError::Kind {
            path: entry.to_owned(),
        });
    };
    let at = format!("{entry}.{kind}");
    let at = at.as_str();
    let PluginSpec {
        access,
        headers,
        rspamd,
        dnsbl,
        dnswl,
        iprev,
        helo,
        spf,
        dkim_verify,
        dmarc,
        arc_verify,
        rate_limit,
        greylist,
        early_talker,
        tarpit,
        recipients,
        webhook,
    } = spec;
    let plugin: Arc<dyn Plugin> = if let Some(s) = access {
        Arc::new(builtin::AccessPlugin::new(s, at)?)
    } else if let Some(s) = headers {
        Arc::new(builtin::HeadersPlugin::new(s, &env.ctx.hostname))
    } else if let Some(s) = rspamd {
        Arc::new(builtin::RspamdPlugin::new(s, at)?)
    } else if let Some(s) = dnsbl {
        Arc::new(builtin::DnsblPlugin::new(s, at, env)?)
    } else if let Some(s) = dnswl {
        Arc::new(builtin::DnswlPlugin::new(s, at, env)?)
    } else if let Some(s) = iprev {
        Arc::new(builtin::IprevPlugin::new(s, at, env)?)
    } else if let Some(s) = helo {
        Arc::new(builtin::HeloPlugin::new(s, at, env)?)
    } else if let Some(s) = spf {
        Arc::new(builtin::SpfPlugin::new(s, at, env)?)
    } else if let Some(s) = dkim_verify {
        Arc::new(builtin::DkimVerifyPlugin::new(s, at, env)?)
    } else if let Some(s) = dmarc {
        Arc::new(builtin::DmarcPlugin::new(s, at, env)?)
    } else if let Some(s) = arc_verify {
        Arc::new(builtin::ArcVerifyPlugin::new(s, at, env)?)
    } else if let Some(s) = rate_limit {
        Arc::new(builtin::RateLimitPlugin::new(s, at, env)?)
    } else if let Some(s) = greylist {
        Arc::new(builtin::GreylistPlugin::new(s, at, env)?)
    } else if let Some(s) = early_talker {
        Arc::new(builtin::EarlyTalkerPlugin::new(s, at, env)?)
    } else if let Some(s) = tarpit {
        Arc::new(builtin::TarpitPlugin::new(s, at, env)?)
    } else if let Some(s) = recipients {
        Arc::new(builtin::RecipientsPlugin::new(s, at, env)?)
    } else if let Some(s) = webhook {
        Arc::new(builtin::WebhookPlugin::new(s, at, env)?)
    } else {
        return Err(PluginError::Kind {
            path: entry.to_owned(),
        });
    };
    Ok(plugin)
}
