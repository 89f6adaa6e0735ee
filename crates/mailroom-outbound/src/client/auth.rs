//! AUTH PLAIN (RFC 4616) or LOGIN, whichever the server offers (PLAIN first), RFC 4954.
//! Credentials are only ever sent over TLS: on a plaintext connection the client refuses
//! before writing anything, even when the server offers AUTH (a STARTTLS-stripping attacker
//! would offer it).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::capabilities::Capabilities;
use super::config::{Credentials, Timeouts};
use super::error::{ClientError, Stage};
use super::io::Io;
use super::session::unexpected;

pub(crate) async fn authenticate(
    io: &mut Io,
    caps: &Capabilities,
    tls: bool,
    credentials: &Credentials,
    timeouts: &Timeouts,
) -> Result<(), ClientError> {
    let unavailable = |io: &Io, reason: String| ClientError::AuthUnavailable {
        peer: io.peer().clone(),
        reason,
    };
    if !tls {
        return Err(unavailable(
            io,
            "refusing to send credentials over a connection without TLS".to_owned(),
        ));
    }
    if caps.auth.is_empty() {
        return Err(unavailable(io, "the server does not offer AUTH".to_owned()));
    }
    let t = timeouts.command;
    if caps.offers_auth("PLAIN") {
        // authzid (empty) NUL authcid NUL passwd, as the initial response (RFC 4954 §4).
        let token = B64.encode(format!("\0{}\0{}", credentials.user, credentials.password));
        let reply = io
            .command(&format!("AUTH PLAIN {token}"), Stage::Auth, t)
            .await?;
        return finish(io, reply, t).await;
    }
    if caps.offers_auth("LOGIN") {
        let mut reply = io.command("AUTH LOGIN", Stage::Auth, t).await?;
        for secret in [&credentials.user, &credentials.password] {
            if reply.code != 334 {
                return finish(io, reply, t).await;
            }
            reply = io.command(&B64.encode(secret), Stage::Auth, t).await?;
        }
        return finish(io, reply, t).await;
    }
    Err(unavailable(
        io,
        format!(
            "the server offers neither AUTH PLAIN nor LOGIN (offers {})",
            caps.auth.join(" ")
        ),
    ))
}

/// 235 ends the exchange; an unexpected 334 challenge is cancelled with `*` (RFC 4954 §4) so
/// that the dialogue stays in step before the error is returned.
async fn finish(
    io: &mut Io,
    reply: mailroom_smtp::Reply,
    timeout: std::time::Duration,
) -> Result<(), ClientError> {
    if reply.code == 235 {
        return Ok(());
    }
    if reply.code == 334 {
        io.command("*", Stage::Auth, timeout).await?;
    }
    Err(unexpected(io, Stage::Auth, reply))
}
