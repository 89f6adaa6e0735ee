//! Per-listener session limits and timeouts. The SMTP session enforces them while reading
//! (never after the fact); the defaults follow RFC 5321 section 4.5.3.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::human::{ByteSize, HumanDuration};

/// Size and count limits of the sessions of one listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted, announced as the EHLO `SIZE` parameter (RFC 1870). Between
    /// 1KiB and 1GiB. Default `25MiB`.
    pub max_message_size: ByteSize,
    /// Most recipients per message. RFC 5321 section 4.5.3.1.8 requires at least 100 on an
    /// `mx` listener; a `submission` listener may use fewer. Default 100.
    pub max_recipients: u32,
    /// Longest text line of a message in bytes, CRLF included (RFC 5321 section 4.5.3.1.6
    /// sets 1000). Between 78 and 1048576. Default 1000.
    pub max_line_length: u32,
    /// Longest command line in bytes, CRLF included (RFC 5321 section 4.5.3.1.4 sets 512;
    /// ESMTP parameters need more). Between 512 and 65536. Default 512.
    pub max_command_length: u32,
    /// Most concurrent connections of this listener; further clients wait in the accept
    /// backlog. Default 10000.
    pub max_connections: u32,
    /// Most concurrent connections from one client IP address; more are refused with 421.
    /// Default 100.
    pub max_connections_per_ip: u32,
    /// Protocol errors allowed per session before it is closed with 421. Default 10.
    pub max_errors: u32,
    /// Most messages accepted over one connection. Default 1000.
    pub max_messages_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: ByteSize::mib(25),
            max_recipients: 100,
            max_line_length: 1000,
            max_command_length: 512,
            max_connections: 10_000,
            max_connections_per_ip: 100,
            max_errors: 10,
            max_messages_per_connection: 1000,
        }
    }
}

/// Timeouts of the sessions of one listener; defaults from RFC 5321 section 4.5.3.2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Timeouts {
    /// Wait for the next command, including MAIL and RCPT. Default `5m`.
    pub command: HumanDuration,
    /// Wait for the first data after the 354 reply to DATA. Default `2m`.
    pub data_init: HumanDuration,
    /// Wait between two chunks of message data. Default `3m`.
    pub data_block: HumanDuration,
    /// Longest time to queue a message after its end of data before answering. Default `10m`.
    pub data_termination: HumanDuration,
    /// Longest TLS handshake (implicit TLS or STARTTLS). Default `30s`.
    pub tls_handshake: HumanDuration,
    /// Longest whole session, however active. Default `30m`.
    pub session: HumanDuration,
    /// On shutdown, how long open transactions may take to finish before their connections
    /// are closed. `0s` closes at once. Default `30s`.
    pub shutdown_grace: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            command: HumanDuration::from_mins(5),
            data_init: HumanDuration::from_mins(2),
            data_block: HumanDuration::from_mins(3),
            data_termination: HumanDuration::from_mins(10),
            tls_handshake: HumanDuration::from_secs(30),
            session: HumanDuration::from_mins(30),
            shutdown_grace: HumanDuration::from_secs(30),
        }
    }
}
