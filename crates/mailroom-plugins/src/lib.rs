//! Mailroom's plugin pipeline: the [`Plugin`] trait, its [`Verdict`]s, the session context a
//! plugin sees, and the registry that turns a listener's declarative `plugins:` list into a
//! [`PluginChain`].
//!
//! Where it sits: `mailroom-inbound` drives an SMTP session and, at each hook point (connect,
//! helo, mail, rcpt, data, queued), asks the listener's chain for a verdict. The hook points and
//! the verdicts follow Haraka's `docs/Plugins.md` (CONT / OK / DENY / DENYSOFT / DENYDISCONNECT)
//! with explicit SMTP replies. Core policy that must never be bypassed (no open relay, AUTH only
//! over TLS, size and recipient limits) is enforced by the server *before* the chain runs, so a
//! plugin can refuse more but never accept what the core refuses.

mod chain;
mod context;
pub mod dns;
pub mod http;
mod notes;
mod pattern;
mod registry;
pub mod shared;
mod verdict;

pub mod builtin;

pub use chain::PluginChain;
pub use context::{MessageEdits, SessionInfo, Transaction};
pub use notes::{Notes, Suspicion, Trusted};
pub use pattern::{AddressPattern, PatternError};
pub use registry::{BuildContext, Env, PluginError, SharedBackend, build_chain};
pub use verdict::{Hook, MAX_REPLY_TEXT, Verdict, reply_text};

use async_trait::async_trait;
use mailroom_smtp::{ForwardPath, RcptParams};

/// One inbound plugin. Every hook has a default that continues, so a plugin implements only the
/// hooks it needs. Plugins are shared by all sessions of a listener: per-session state lives in
/// [`SessionInfo`] / [`Transaction`], never in the plugin.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// The plugin's kind as written in the config (`access`, `headers`): used in logs and metrics.
    fn name(&self) -> &'static str;

    /// A client connected (after the PROXY header, before the greeting).
    async fn connect(&self, _session: &SessionInfo) -> Verdict {
        Verdict::Continue
    }

    /// How long the server waits before its greeting (after the connect hook). A client that
    /// talks during the wait is refused with 554 5.5.1 and disconnected (`earlyTalker`).
    fn greeting_delay(&self, _session: &SessionInfo) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// How long the server waits before it sends its replies to each command (`tarpit`). Asked
    /// before every flush of replies, so notes other plugins took later count.
    fn reply_delay(&self, _session: &SessionInfo) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// The client said EHLO/HELO with `name`.
    async fn helo(&self, _session: &SessionInfo, _name: &str) -> Verdict {
        Verdict::Continue
    }

    /// `MAIL FROM` passed the server's own checks. `tx` is the new transaction (sender and
    /// parameters, no recipients yet); it is dropped if the verdict refuses it.
    async fn mail(&self, _session: &SessionInfo, _tx: &Transaction) -> Verdict {
        Verdict::Continue
    }

    /// `RCPT TO` passed the server's own checks (relay, limits).
    async fn rcpt(
        &self,
        _session: &SessionInfo,
        _tx: &Transaction,
        _to: &ForwardPath,
        _params: &RcptParams,
    ) -> Verdict {
        Verdict::Continue
    }

    /// The whole message was received (`body` is the message as sent, CRLF line endings). A plugin
    /// may add headers through `edits`.
    async fn data(
        &self,
        _session: &SessionInfo,
        _tx: &Transaction,
        _body: &[u8],
        _edits: &mut MessageEdits,
    ) -> Verdict {
        Verdict::Continue
    }

    /// The message is durably queued as `queue_id` (informational; the reply is already decided).
    async fn queued(&self, _session: &SessionInfo, _tx: &Transaction, _queue_id: &str) {}
}
