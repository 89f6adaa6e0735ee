//! An ordered list of plugins and the rule that runs it: plugins are asked in declaration
//! order; the first verdict other than `Continue` ends the hook.

use std::sync::Arc;

use mailroom_smtp::{ForwardPath, RcptParams};

use crate::{Hook, MessageEdits, Plugin, SessionInfo, Transaction, Verdict};

/// The plugin chain of one listener, built once from its `plugins:` list by
/// [`build_chain`](crate::build_chain) and shared by its sessions.
#[derive(Clone, Default)]
pub struct PluginChain {
    plugins: Vec<Arc<dyn Plugin>>,
}

impl std::fmt::Debug for PluginChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.plugins.iter().map(|p| p.name()))
            .finish()
    }
}

impl PluginChain {
    /// A chain of the given plugins, in order.
    pub fn new(plugins: Vec<Arc<dyn Plugin>>) -> Self {
        PluginChain { plugins }
    }

    /// Number of plugins.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// True when the chain has no plugins.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Names of the plugins, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.plugins.iter().map(|p| p.name()).collect()
    }

    fn decided(
        verdict: Verdict,
        plugin: &dyn Plugin,
        hook: Hook,
    ) -> Option<(Verdict, &'static str)> {
        if verdict == Verdict::Continue {
            return None;
        }
        tracing::debug!(
            plugin = plugin.name(),
            hook = hook.as_str(),
            verdict = verdict.label(),
            "plugin decided"
        );
        Some((verdict, plugin.name()))
    }

    /// Runs the connect hook.
    pub async fn connect(&self, s: &SessionInfo) -> Verdict {
        for p in &self.plugins {
            if let Some((v, _)) = Self::decided(p.connect(s).await, p.as_ref(), Hook::Connect) {
                return v;
            }
        }
        Verdict::Continue
    }

    /// Runs the helo hook.
    pub async fn helo(&self, s: &SessionInfo, name: &str) -> Verdict {
        for p in &self.plugins {
            if let Some((v, _)) = Self::decided(p.helo(s, name).await, p.as_ref(), Hook::Helo) {
                return v;
            }
        }
        Verdict::Continue
    }

    /// Runs the mail hook for a new transaction.
    pub async fn mail(&self, s: &SessionInfo, tx: &Transaction) -> Verdict {
        for p in &self.plugins {
            if let Some((v, _)) = Self::decided(p.mail(s, tx).await, p.as_ref(), Hook::Mail) {
                return v;
            }
        }
        Verdict::Continue
    }

    /// The longest greeting delay any plugin asks for.
    pub fn greeting_delay(&self, s: &SessionInfo) -> std::time::Duration {
        self.plugins
            .iter()
            .map(|p| p.greeting_delay(s))
            .max()
            .unwrap_or_default()
    }

    /// The longest reply delay any plugin asks for.
    pub fn reply_delay(&self, s: &SessionInfo) -> std::time::Duration {
        self.plugins
            .iter()
            .map(|p| p.reply_delay(s))
            .max()
            .unwrap_or_default()
    }

    /// Runs the rcpt hook.
    pub async fn rcpt(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        to: &ForwardPath,
        params: &RcptParams,
    ) -> Verdict {
        for p in &self.plugins {
            if let Some((v, _)) =
                Self::decided(p.rcpt(s, tx, to, params).await, p.as_ref(), Hook::Rcpt)
            {
                return v;
            }
        }
        Verdict::Continue
    }

    /// Runs the data hook; edits of every plugin that ran are kept in `edits`, and the
    /// authentication results they recorded become one `Authentication-Results:` field.
    pub async fn data(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        let mut verdict = Verdict::Continue;
        for p in &self.plugins {
            if let Some((v, _)) =
                Self::decided(p.data(s, tx, body, edits).await, p.as_ref(), Hook::Data)
            {
                verdict = v;
                break;
            }
        }
        edits.finish_auth_results(&s.hostname);
        verdict
    }

    /// Tells every plugin that the message was queued.
    pub async fn queued(&self, s: &SessionInfo, tx: &Transaction, queue_id: &str) {
        for p in &self.plugins {
            p.queued(s, tx, queue_id).await;
        }
    }
}
