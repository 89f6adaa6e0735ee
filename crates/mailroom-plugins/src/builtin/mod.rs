//! The built-in plugins. Each has a typed spec in `mailroom-config`.

mod access;
mod auth;
mod dnsbl;
mod early_talker;
mod greylist;
mod headers;
mod helo;
mod iprev;
mod rate_limit;
mod recipients;
mod rspamd;
mod tarpit;
mod webhook;

pub use access::AccessPlugin;
pub use auth::{
    ArcVerifyPlugin, DkimNote, DkimSignatureResult, DkimVerifyPlugin, DmarcPlugin, SpfIdentity,
    SpfNote, SpfPlugin,
};
pub use dnsbl::{DnsblPlugin, DnswlPlugin};
pub use early_talker::EarlyTalkerPlugin;
pub use greylist::GreylistPlugin;
pub use headers::{HeadersPlugin, has_header, header_value};
pub use helo::HeloPlugin;
pub use iprev::{Iprev, IprevPlugin, IprevResult};
pub use rate_limit::RateLimitPlugin;
pub use recipients::RecipientsPlugin;
pub use rspamd::RspamdPlugin;
pub use tarpit::TarpitPlugin;
pub use webhook::WebhookPlugin;
