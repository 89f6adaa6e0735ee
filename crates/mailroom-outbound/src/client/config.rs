//! Settings of the SMTP client: one [`ClientConfig`] per delivery policy (MX delivery) or
//! relay, shared by all its connections; one [`Target`] per connection attempt.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mailroom_config::{ClientTimeouts, OutboundTlsMode, RelayTls};

use super::tls::TlsRoots;

/// Default longest reply line, CRLF included. RFC 5321 §4.5.3.1.5 sets 512, but real servers
/// send longer texts; like Postfix's `line_length_limit` we accept 2048 and refuse more.
pub const DEFAULT_MAX_REPLY_LINE: usize = 2048;

/// Where to connect: one address of an MX host or relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The address and port to connect to.
    pub addr: SocketAddr,
    /// The host name the address belongs to (MX host name or relay host): sent as SNI and
    /// checked against the certificate when the policy verifies. An IP address literal is
    /// verified against the certificate's IP addresses instead (and no SNI is sent).
    pub host: String,
}

impl Target {
    /// A target at `ip:port` for the host `host`.
    pub fn new(ip: IpAddr, port: u16, host: impl Into<String>) -> Target {
        Target {
            addr: SocketAddr::new(ip, port),
            host: host.into(),
        }
    }
}

/// How TLS is used on a connection.
///
/// Failures of a TLS policy are always transient ([`ClientError::is_permanent`] is false).
/// When a STARTTLS handshake fails under `Opportunistic`, the connection is unusable (the
/// server is mid-handshake); `connect` reports [`ClientError::Tls`] and does **not** retry in
/// plaintext by itself, so that the decision stays visible in the delivery log. A caller that
/// wants Postfix's behaviour (`smtp_tls_security_level = may` retries without TLS) connects
/// again with `Disabled`.
///
/// [`ClientError::is_permanent`]: super::ClientError::is_permanent
/// [`ClientError::Tls`]: super::ClientError::Tls
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never STARTTLS.
    Disabled,
    /// STARTTLS when offered, without certificate verification (RFC 7435 opportunistic
    /// security); plaintext when not offered or when STARTTLS gets an error reply
    /// (RFC 3207 §4). The handshake signature is still checked.
    #[default]
    Opportunistic,
    /// STARTTLS must be offered and succeed, and (with `ClientConfig::verify_certificates`)
    /// the certificate must verify against the roots for `Target::host`.
    Required,
    /// TLS from the first byte (RFC 8314, port 465 relays), verified like `Required`.
    Implicit,
}

impl From<OutboundTlsMode> for TlsPolicy {
    fn from(mode: OutboundTlsMode) -> TlsPolicy {
        match mode {
            OutboundTlsMode::Opportunistic => TlsPolicy::Opportunistic,
            OutboundTlsMode::Required => TlsPolicy::Required,
            OutboundTlsMode::Disabled => TlsPolicy::Disabled,
        }
    }
}

impl From<RelayTls> for TlsPolicy {
    fn from(tls: RelayTls) -> TlsPolicy {
        match tls {
            RelayTls::Starttls => TlsPolicy::Required,
            RelayTls::Implicit => TlsPolicy::Implicit,
            RelayTls::None => TlsPolicy::Disabled,
        }
    }
}

/// Per-stage timeouts (RFC 5321 §4.5.3.2 gives the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, and each TLS handshake (implicit or after STARTTLS). Default 30s.
    pub connect: Duration,
    /// The greeting. Default 5m.
    pub greeting: Duration,
    /// The reply to each command: EHLO/HELO, STARTTLS, AUTH, MAIL, RCPT, RSET, QUIT. Also
    /// bounds each write of a group of pipelined commands. Default 5m.
    pub command: Duration,
    /// The 354 after DATA. Default 2m.
    pub data_start: Duration,
    /// Each write of the message body (at most 64 KiB). Default 3m.
    pub data_block: Duration,
    /// The reply after the final dot (or BDAT LAST). Default 10m.
    pub data_end: Duration,
}

impl Default for Timeouts {
    /// The policy defaults (`ClientTimeouts::default()`).
    fn default() -> Self {
        Timeouts::from(&ClientTimeouts::default())
    }
}

impl From<&ClientTimeouts> for Timeouts {
    fn from(t: &ClientTimeouts) -> Timeouts {
        Timeouts {
            connect: t.connect.as_duration(),
            greeting: t.greeting.as_duration(),
            command: t.command.as_duration(),
            data_start: t.data_start.as_duration(),
            data_block: t.data_block.as_duration(),
            data_end: t.data_end.as_duration(),
        }
    }
}

/// AUTH credentials (PLAIN or LOGIN, whichever the server offers, PLAIN first). `Debug`
/// does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name (authentication identity).
    pub user: String,
    /// The password.
    pub password: String,
}

impl Credentials {
    /// Credentials for `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Settings shared by the connections of one delivery policy or relay.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The name sent with EHLO/HELO: a host name or an address literal, printable ASCII
    /// without spaces.
    pub helo_name: String,
    /// STARTTLS / implicit TLS.
    pub tls: TlsPolicy,
    /// Verify the certificate under `Required` and `Implicit` (default true). Turning it off
    /// still encrypts (a relay's `verifyCertificate: false`); `Opportunistic` never verifies.
    pub verify_certificates: bool,
    /// The trust anchors for verification (system roots or a private CA).
    pub roots: TlsRoots,
    /// AUTH credentials; only ever sent over TLS (see [`ClientError::AuthUnavailable`]).
    ///
    /// [`ClientError::AuthUnavailable`]: super::ClientError::AuthUnavailable
    pub credentials: Option<Credentials>,
    /// Per-stage timeouts.
    pub timeouts: Timeouts,
    /// Longest reply line accepted, CRLF included; a longer one is a protocol error.
    pub max_reply_line: usize,
}

impl ClientConfig {
    /// Opportunistic TLS, no roots, no credentials, default timeouts.
    pub fn new(helo_name: impl Into<String>) -> ClientConfig {
        ClientConfig {
            helo_name: helo_name.into(),
            tls: TlsPolicy::default(),
            verify_certificates: true,
            roots: TlsRoots::default(),
            credentials: None,
            timeouts: Timeouts::default(),
            max_reply_line: DEFAULT_MAX_REPLY_LINE,
        }
    }

    /// Checks what a peer cannot influence: the HELO name goes on the wire verbatim.
    pub(crate) fn check(&self) -> Result<(), String> {
        let name = self.helo_name.as_bytes();
        if name.is_empty() || name.len() > 255 || !name.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(format!(
                "HELO name {:?} must be 1-255 printable ASCII characters without spaces",
                self.helo_name
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helo_name_is_checked_and_password_hidden() {
        assert!(ClientConfig::new("mta.example.com").check().is_ok());
        assert!(ClientConfig::new("[192.0.2.1]").check().is_ok());
        for bad in ["", "a b", "a\r\nMAIL FROM:<x@y>", "é.example"] {
            assert!(ClientConfig::new(bad).check().is_err(), "{bad:?}");
        }
        let creds = format!("{:?}", Credentials::new("alice", "s3cret"));
        assert!(
            creds.contains("alice") && !creds.contains("s3cret"),
            "{creds}"
        );
    }

    #[test]
    fn policies_from_config() {
        assert_eq!(
            TlsPolicy::from(OutboundTlsMode::default()),
            TlsPolicy::Opportunistic
        );
        assert_eq!(TlsPolicy::from(RelayTls::Starttls), TlsPolicy::Required);
        assert_eq!(TlsPolicy::from(RelayTls::Implicit), TlsPolicy::Implicit);
        let t = Timeouts::from(&ClientTimeouts::default());
        assert_eq!(t, Timeouts::default());
    }
}
