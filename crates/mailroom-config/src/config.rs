//! The top-level model: the file read by `mailroom serve --config F` (listeners, the embedded
//! queue, the HTTP endpoint for health and metrics, logging). `load` parses it, `validate`
//! checks it; the server only ever sees a validated [`Config`].

use std::net::{AddrParseError, Ipv4Addr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::HumanDuration;

use crate::listener::ListenerSpec;
use crate::policy::DeliveryPolicySpec;

/// A whole Mailroom configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Name announced in greeting banners, EHLO replies and `Received:` headers, unless a
    /// listener sets its own. Default: the system host name (`/etc/hostname`), else
    /// `localhost`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The SMTP listeners; at least one, with unique names and addresses.
    pub listeners: Vec<ListenerSpec>,
    /// Where accepted messages are stored until delivered.
    pub queue: QueueSpec,
    /// How queued mail is delivered, one entry per delivery policy (unique names). When
    /// empty, one policy named `default` with default settings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<DeliveryPolicySpec>,
    /// The HTTP endpoint serving `/healthz`, `/readyz` and `/metrics`.
    pub http: HttpSpec,
    /// Logging.
    pub log: LogSpec,
}

impl Config {
    /// The name this server announces: `hostname`, else the system host name.
    pub fn effective_hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(system_hostname)
    }

    /// The name `listener` announces: its own `hostname`, else [`Config::effective_hostname`].
    pub fn listener_hostname(&self, listener: &ListenerSpec) -> String {
        listener
            .hostname
            .clone()
            .unwrap_or_else(|| self.effective_hostname())
    }

    /// The delivery policies in effect: `policies`, or one `default` policy when it is empty.
    pub fn effective_policies(&self) -> Vec<DeliveryPolicySpec> {
        if self.policies.is_empty() {
            vec![DeliveryPolicySpec::default()]
        } else {
            self.policies.clone()
        }
    }

    /// The listener called `name`.
    pub fn listener(&self, name: &str) -> Option<&ListenerSpec> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// Brings values into their canonical form: accepted domains lowercased, without a
    /// trailing dot. [`crate::load_str`] calls it before validating; call it yourself on a
    /// `Config` built another way (for example from a CRD spec).
    pub fn normalize(&mut self) {
        for listener in &mut self.listeners {
            for domain in &mut listener.accepted_domains {
                let trimmed = domain.trim();
                *domain = trimmed
                    .strip_suffix('.')
                    .unwrap_or(trimmed)
                    .to_ascii_lowercase();
            }
        }
    }
}

/// The system host name: the first line of `/etc/hostname` when it is a valid domain name,
/// else `localhost`.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
        .filter(|name| crate::syntax::check_domain(name, false).is_ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The queue backend. Set exactly one field; when the whole `queue` section is absent, a
/// `local` queue in `./spool` is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueSpec {
    /// An on-disk queue in a local directory, for `mailroom serve` and tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalQueueSpec>,
    /// NATS JetStream: the shared, durable queue between inbound pods and outbound workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamQueueSpec>,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            local: Some(LocalQueueSpec::default()),
            jetstream: None,
        }
    }
}

impl QueueSpec {
    /// Every backend, as spelled in the configuration.
    pub const BACKENDS: &'static [&'static str] = &["local", "jetstream"];

    /// The names of the backends that are set; validation requires exactly one.
    pub(crate) fn backends_set(&self) -> Vec<&'static str> {
        let Self { local, jetstream } = self; // a new field fails to compile here: add it below
        [
            ("local", local.is_some()),
            ("jetstream", jetstream.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

/// An on-disk queue: one file per message, written and fsynced in batches (group commit)
/// before the 250 reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalQueueSpec {
    /// The spool directory; created when missing. Default `./spool`.
    pub path: String,
    /// Most messages made durable by one fsync batch. Between 1 and 65536. Default 256.
    pub max_batch: u32,
    /// How a batch is made durable before the 250 reply: `filesystem` (default) syncs the
    /// spool's file system once per batch (fastest; put the spool on its own volume), `file`
    /// fdatasyncs every message file (for a spool that shares a busy file system).
    pub sync: SpoolSync,
    /// How long a delivery worker holds a message without extending its lease; after that a
    /// worker that died has its messages handed out again. Default 5m.
    pub lease_time: HumanDuration,
}

impl Default for LocalQueueSpec {
    fn default() -> Self {
        Self {
            path: "./spool".to_owned(),
            max_batch: 256,
            sync: SpoolSync::default(),
            lease_time: HumanDuration::from_secs(300),
        }
    }
}

/// The JetStream queue: where NATS is, how to authenticate, and the stream's layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct JetStreamQueueSpec {
    /// NATS server URLs, e.g. `nats://nats.mail.svc:4222`; several for a cluster. Default
    /// `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// A NATS credentials file (JWT + NKey seed), as made by `nsc`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    /// A file holding an NKey seed (`SU...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<String>,
    /// A file holding the token for token authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// User name for user/password authentication (with `passwordFile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A file holding the password of `user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// TLS to the NATS servers (rustls): custom CA and client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTlsSpec>,
    /// Stream name. Default `MAILROOM`.
    pub stream: String,
    /// Stream replicas: 1, or 3 on a NATS cluster. Default 1.
    pub replicas: u8,
    /// Stream storage: `file` (default) or `memory` (tests only: lost on a NATS restart).
    pub storage: StreamStorage,
    /// Oldest message the stream keeps, a safety net above every policy's maxAge. Default 7d.
    pub max_age: HumanDuration,
    /// How long the inbound server waits for the publish acknowledgement before it answers
    /// `451 4.3.0`. Default 10s.
    pub publish_timeout: HumanDuration,
    /// How long a delivery worker holds an entry without extending its lease (the consumers'
    /// `ack_wait`); after that a worker that died has its entries handed out again. Default 5m.
    pub lease_time: HumanDuration,
    /// Most entries of one delivery policy leased at once over all workers (the consumers'
    /// `max_ack_pending`). Default 20000.
    pub max_leased: u32,
}

impl Default for JetStreamQueueSpec {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            credentials_file: None,
            nkey_seed_file: None,
            token_file: None,
            user: None,
            password_file: None,
            tls: None,
            stream: "MAILROOM".to_owned(),
            replicas: 1,
            storage: StreamStorage::default(),
            max_age: HumanDuration::from_secs(7 * 24 * 3600),
            publish_timeout: HumanDuration::from_secs(10),
            lease_time: HumanDuration::from_secs(300),
            max_leased: 20_000,
        }
    }
}

/// TLS settings for the connection to NATS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NatsTlsSpec {
    /// PEM file of the CA that signed the NATS servers' certificates (default: system roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM client certificate, for servers that verify clients (with `keyFile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM private key of `certFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// Where the JetStream stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum StreamStorage {
    /// On disk (durable).
    #[default]
    File,
    /// In memory (lost when the NATS server restarts; for tests).
    Memory,
}

/// How the local spool makes a batch of messages durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum SpoolSync {
    /// One syncfs(2) of the spool's file system per batch.
    #[default]
    Filesystem,
    /// One fdatasync(2) per message file.
    File,
}

/// The HTTP endpoint for health checks and Prometheus metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpSpec {
    /// Socket address to listen on. Default `127.0.0.1:9325`; use `0.0.0.0:9325` in a pod.
    pub address: String,
}

impl Default for HttpSpec {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:9325".to_owned(),
        }
    }
}

impl HttpSpec {
    /// The parsed `address`, or the parse error.
    pub fn try_socket_addr(&self) -> Result<SocketAddr, AddrParseError> {
        self.address.trim().parse()
    }

    /// The parsed `address`. Meant for validated configurations; should it not parse anyway,
    /// this returns `127.0.0.1:0`, a loopback ephemeral port that exposes nothing.
    pub fn socket_addr(&self) -> SocketAddr {
        self.try_socket_addr()
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }
}

/// Logging: the diagnostic log on stderr and the delivery log of message events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LogSpec {
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or `info,mailroom_smtp=debug`.
    /// The `RUST_LOG` environment variable overrides it. Default `info`.
    pub level: String,
    /// `text` (default) for people, `json` for log collectors.
    pub format: LogFormat,
    /// File that receives the delivery log (one JSON object per reception, delivery or
    /// bounce). When unset, delivery events are written to stdout as JSON lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_log: Option<String>,
}

impl Default for LogSpec {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::default(),
            delivery_log: None,
        }
    }
}

/// Format of the diagnostic log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}
