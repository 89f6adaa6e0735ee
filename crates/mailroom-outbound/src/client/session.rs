//! Opening a connection: TCP connect, implicit TLS, greeting, EHLO (HELO fallback), STARTTLS by
//! policy with a fresh EHLO, then AUTH. The upgrade is a typed conversion: the plaintext
//! [`Io`] is consumed, so its read buffer and capabilities cannot survive into the TLS session
//! (RFC 3207 §4.2).

use mailroom_smtp::Reply;

use super::auth::authenticate;
use super::capabilities::Capabilities;
use super::config::{ClientConfig, TlsPolicy};
use super::error::{ClientError, Peer, ProtocolError, Stage};
use super::io::{Io, Stream, tcp_connect};
use super::tls::{TlsInfo, handshake};

/// A connection after setup, ready for transactions.
pub(crate) struct Established {
    pub(crate) io: Io,
    pub(crate) greeting: Reply,
    pub(crate) capabilities: Capabilities,
    pub(crate) tls: Option<TlsInfo>,
}

/// Runs the whole setup of [`Connection::connect`](super::Connection::connect).
pub(crate) async fn establish(
    peer: Peer,
    config: &ClientConfig,
) -> Result<Established, ClientError> {
    config
        .check()
        .map_err(|reason| ClientError::InvalidConfig { reason })?;
    let t = &config.timeouts;
    let tcp = tcp_connect(&peer, t.connect).await?;
    let (stream, mut tls) = if config.tls == TlsPolicy::Implicit {
        let (s, info) = handshake(
            tcp,
            &peer,
            &config.roots,
            config.verify_certificates,
            true,
            t.connect,
        )
        .await?;
        (Stream::Tls(Box::new(s)), Some(info))
    } else {
        (Stream::Plain(tcp), None)
    };
    let mut io = Io::new(stream, peer, config.max_reply_line);

    let greeting = io.read_reply(Stage::Greeting, t.greeting).await?;
    if greeting.code != 220 {
        // RFC 5321 §3.1: after a 554 (or any refusal) the client should QUIT; best effort.
        let _ = io.write_all(b"QUIT\r\n", Stage::Quit, t.command).await;
        return Err(unexpected(&io, Stage::Greeting, greeting));
    }
    let mut capabilities = hello(&mut io, config).await?;

    let starttls = matches!(config.tls, TlsPolicy::Opportunistic | TlsPolicy::Required);
    if starttls && tls.is_none() {
        if capabilities.starttls {
            match start_tls(io, config).await? {
                Upgrade::Done(new_io, info) => {
                    io = new_io;
                    tls = Some(info);
                    capabilities = hello(&mut io, config).await?;
                }
                Upgrade::Refused(old_io) => io = old_io,
            }
        } else if config.tls == TlsPolicy::Required {
            return Err(ClientError::TlsNotOffered {
                peer: io.peer().clone(),
            });
        }
    }

    if let Some(credentials) = &config.credentials {
        authenticate(&mut io, &capabilities, tls.is_some(), credentials, t).await?;
    }
    Ok(Established {
        io,
        greeting,
        capabilities,
        tls,
    })
}

pub(crate) fn unexpected(io: &Io, stage: Stage, reply: Reply) -> ClientError {
    ClientError::UnexpectedReply {
        peer: io.peer().clone(),
        stage,
        reply,
    }
}

/// EHLO, or HELO when EHLO gets a 5xx (RFC 5321 §4.1.4: a server without ESMTP answers 500 or
/// 502). A 4xx to EHLO is not retried with HELO: the server is busy, not old.
async fn hello(io: &mut Io, config: &ClientConfig) -> Result<Capabilities, ClientError> {
    let timeout = config.timeouts.command;
    let ehlo = format!("EHLO {}", config.helo_name);
    let reply = io.command(&ehlo, Stage::Ehlo, timeout).await?;
    if (200..300).contains(&reply.code) {
        return Ok(Capabilities::from_ehlo(&reply));
    }
    if !reply.is_permanent() {
        return Err(unexpected(io, Stage::Ehlo, reply));
    }
    let helo = format!("HELO {}", config.helo_name);
    let reply = io.command(&helo, Stage::Helo, timeout).await?;
    if (200..300).contains(&reply.code) {
        return Ok(Capabilities::from_helo(&reply));
    }
    Err(unexpected(io, Stage::Helo, reply))
}

enum Upgrade {
    Done(Io, TlsInfo),
    /// The server answered STARTTLS with an error and `Opportunistic` goes on in plaintext.
    Refused(Io),
}

/// STARTTLS and the handshake. Verification follows the policy: `Required` verifies unless
/// `verify_certificates` is off; `Opportunistic` never does.
async fn start_tls(mut io: Io, config: &ClientConfig) -> Result<Upgrade, ClientError> {
    let t = &config.timeouts;
    let reply = io.command("STARTTLS", Stage::StartTls, t.command).await?;
    if reply.code != 220 {
        // RFC 3207 §4: 454 "TLS not available due to temporary reason"; 421 closes.
        if config.tls == TlsPolicy::Opportunistic && reply.code != 421 {
            return Ok(Upgrade::Refused(io));
        }
        return Err(unexpected(&io, Stage::StartTls, reply));
    }
    if io.has_buffered_input() {
        return Err(ClientError::Protocol {
            peer: io.peer().clone(),
            stage: Stage::StartTls,
            error: ProtocolError::DataAfterStartTls,
        });
    }
    let peer = io.peer().clone();
    let Some(tcp) = io.into_tcp() else {
        return Err(ClientError::InvalidConfig {
            reason: "STARTTLS on a TLS connection".to_owned(),
        });
    };
    let verify = config.tls == TlsPolicy::Required && config.verify_certificates;
    let (stream, info) = handshake(tcp, &peer, &config.roots, verify, false, t.connect).await?;
    let io = Io::new(Stream::Tls(Box::new(stream)), peer, config.max_reply_line);
    Ok(Upgrade::Done(io, info))
}
