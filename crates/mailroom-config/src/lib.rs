//! Mailroom's declarative model and its validation. The same serde + schemars types are the
//! YAML file of `mailroom serve --config F`, the file an inbound pod reads, and (later) the
//! `spec` of the `MailListener` CRD, so a configuration behaves the same wherever it runs.
//! Flow: [`load_file`] / [`load_str`] parse YAML (errors name the field path and position),
//! [`Config::normalize`] canonicalises, [`Config::validate`] collects every semantic problem;
//! the server, the plugin chain and the queue then read the typed [`Config`]. Human strings
//! (durations, sizes, rates) are parsed only in [`human`].
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod config;
pub mod human;
mod limits;
mod listener;
mod load;
mod plugins;
mod policy;
mod schema;
pub mod syntax;
mod validate;

pub use config::{
    Config, HttpSpec, JetStreamQueueSpec, LocalQueueSpec, LogFormat, LogSpec, NatsTlsSpec,
    QueueSpec, SpoolSync, StreamStorage, system_hostname,
};
pub use human::{ByteSize, HumanDuration, HumanError, Rate};
pub use limits::{Limits, Timeouts};
pub use listener::{AuthMechanism, AuthSpec, DnsSpec, ListenerMode, ListenerSpec, TlsSpec};
pub use load::{ConfigError, Problem, load_file, load_str, parse};
pub use plugins::{
    AccessPluginSpec, ArcVerifyPluginSpec, AuthAction, CatchAllSpec, DkimVerifyPluginSpec,
    DmarcPluginSpec, DnsZoneSpec, DnsblAction, DnsblPluginSpec, DnsblRejectAt, DnswlPluginSpec,
    EarlyTalkerPluginSpec, FailMode, GreylistPluginSpec, HeadersPluginSpec, HeloCheckMode,
    HeloPluginSpec, HttpHeaderSpec, IprevOnFail, IprevPluginSpec, PluginSpec, RateLimitCount,
    RateLimitKey, RateLimitPluginSpec, RateLimitSpec, RateWindow, RecipientAliasSpec,
    RecipientsHttpSpec, RecipientsPluginSpec, RspamdPluginSpec, Sidecar, SidecarSpec,
    SpfPluginSpec, TarpitPluginSpec, WebhookHook, WebhookPluginSpec,
};
pub use policy::{
    BounceSpec, ClientTimeouts, DeliveryPolicySpec, DestinationSpec, DkimAlgorithm, DkimSpec,
    IpVersion, OutboundTlsMode, RelaySpec, RelayTls, ResolverSpec, RetrySpec, RoutingSpec,
    RuleAction, RuleSpec, ShapingLimits,
};
pub use schema::json_schema;

/// The default configuration, `config/mailroom.yaml`: one `mx` listener on
/// `127.0.0.1:2525` for `example.test`, a local queue in `./spool`, metrics on
/// `127.0.0.1:9325`. `mailroom serve` uses it when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/mailroom.yaml");

#[cfg(test)]
mod tests;
