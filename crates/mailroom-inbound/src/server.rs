//! The accept loop of one listener (after tokio-rs/mini-redis `server.rs`): bind, accept with
//! backoff on transient errors, enforce the connection limits, read the PROXY header, do the
//! implicit TLS handshake, and run a session per connection. Shutdown is passed in, never
//! global: `stop` ends accepting and closes idle sessions with `421 4.3.2`; transactions in
//! flight may finish until `abort` fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailroom_config::ListenerSpec;
use mailroom_plugins::SessionInfo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::Prefixed;
use crate::context::{InboundDeps, ListenerContext};
use crate::proxy::read_proxy_header;
use crate::session::{Ended, Session, reply};
use crate::{InboundError, metrics};

/// The two shutdown signals of a server.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop accepting; idle sessions close with 421.
    pub stop: CancellationToken,
    /// The grace period is over: every session closes now with 421.
    pub abort: CancellationToken,
}

/// A bound listener, ready to run.
pub struct Listener {
    ctx: Arc<ListenerContext>,
    tcp: TcpListener,
    /// The bound address unless it is a wildcard (0.0.0.0 / ::).
    fixed_local: Option<SocketAddr>,
    reload_every: Option<Duration>,
}

impl Listener {
    /// Resolves the spec and binds its address. `path` names the spec in errors (`listeners[0]`).
    pub async fn bind(
        spec: &ListenerSpec,
        path: &str,
        deps: &InboundDeps,
    ) -> Result<Listener, InboundError> {
        let ctx = ListenerContext::build(spec, path, deps)?;
        let addr = spec.socket_addr();
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| InboundError::Bind {
                listener: spec.name.clone(),
                addr: addr.to_string(),
                source,
            })?;
        let reload_every = spec.tls.as_ref().map(|t| t.reload_interval.as_duration());
        // Export the main series at zero from the start, so dashboards and rate() see them.
        metrics::MESSAGES_ACCEPTED.with_label_values(&[&spec.name]);
        metrics::SESSIONS_ACTIVE.with_label_values(&[&spec.name]);
        metrics::CONNECTIONS.with_label_values(&[&spec.name, "accepted"]);
        let fixed_local = tcp.local_addr().ok().filter(|a| !a.ip().is_unspecified());
        Ok(Listener {
            ctx: Arc::new(ctx),
            tcp,
            fixed_local,
            reload_every,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    /// Accepts connections until `shutdown.stop`, then waits for every session to end.
    pub async fn run(self, shutdown: Shutdown) {
        if let (Some(cert), Some(every)) = (&self.ctx.cert, self.reload_every) {
            cert.spawn_watcher(every, shutdown.abort.clone());
        }
        let tracker = TaskTracker::new();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.stop.cancelled() => break,
                a = self.tcp.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(5);
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %self.ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let ctx = Arc::clone(&self.ctx);
            let sd = shutdown.clone();
            tracker.spawn(handle_connection(stream, peer, self.fixed_local, ctx, sd));
        }
        // Close the socket now: new connections are refused (the sender tries another MX)
        // instead of waiting unanswered while open sessions finish.
        drop(self.tcp);
        tracker.close();
        tracker.wait().await;
    }
}

/// Counts a refused connection under `result` and closes it with `421 4.7.0 <text>`.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    ctx: &ListenerContext,
    result: &str,
    text: &str,
) {
    metrics::CONNECTIONS
        .with_label_values(&[&ctx.name, result])
        .inc();
    let r = reply(421, (4, 7, 0), format!("{} {text}", ctx.hostname));
    let _ = stream.write_all(&r.to_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn handle_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    fixed_local: Option<SocketAddr>,
    ctx: Arc<ListenerContext>,
    shutdown: Shutdown,
) {
    let _ = stream.set_nodelay(true);
    let name = ctx.name.clone();
    let Some(_total) = ctx.connections.try_total(ctx.limits.max_connections) else {
        refuse(
            &mut stream,
            &ctx,
            "limit_total",
            "Too many connections; try again later",
        )
        .await;
        return;
    };
    // A listener bound to one address knows its local address; only a wildcard bind asks.
    let local = fixed_local.unwrap_or_else(|| stream.local_addr().unwrap_or(peer));
    let (client, prefix) = if ctx.proxy_protocol {
        match tokio::time::timeout(ctx.timeouts.tls_handshake, read_proxy_header(&mut stream)).await
        {
            Ok(Ok((client, rest))) => (client.unwrap_or(peer), rest),
            outcome => {
                metrics::CONNECTIONS
                    .with_label_values(&[&name, "proxy_error"])
                    .inc();
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no complete header in time".to_string(),
                };
                tracing::info!(listener = %name, peer = %peer, error = %why, "PROXY header refused");
                return;
            }
        }
    } else {
        (peer, bytes::BytesMut::new())
    };
    let Some(_per_ip) = ctx
        .connections
        .try_ip(client.ip(), ctx.limits.max_connections_per_ip)
    else {
        refuse(
            &mut stream,
            &ctx,
            "limit_per_ip",
            "Too many connections from your address",
        )
        .await;
        return;
    };
    metrics::CONNECTIONS
        .with_label_values(&[&name, "accepted"])
        .inc();
    let active = metrics::SESSIONS_ACTIVE.with_label_values(&[&name]);
    active.inc();
    let stream = Prefixed::new(prefix, stream);
    let info = SessionInfo {
        submission: ctx.submission,
        ..SessionInfo::new(name.clone(), ctx.hostname.clone(), client, local)
    };
    // The TLS path is boxed so that a plaintext session's task does not carry its (large) state.
    if ctx.implicit_tls {
        Box::pin(tls_session(stream, ctx, info, shutdown, true)).await;
    } else {
        let ended = Session::new(stream, Arc::clone(&ctx), info.clone(), shutdown.clone())
            .run(true)
            .await;
        if let Ended::StartTls(stream) = ended {
            Box::pin(tls_session(stream, ctx, info, shutdown, false)).await;
        }
    }
    active.dec();
}

/// Performs the TLS handshake and runs a session over it; `greet` is true for implicit TLS.
async fn tls_session<S>(
    stream: S,
    ctx: Arc<ListenerContext>,
    mut info: SessionInfo,
    shutdown: Shutdown,
    greet: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(acceptor) = ctx.tls.clone() else {
        return;
    };
    let tls = match tokio::time::timeout(ctx.timeouts.tls_handshake, acceptor.accept(stream)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics::CONNECTIONS
                .with_label_values(&[&ctx.name, "tls_error"])
                .inc();
            tracing::info!(listener = %ctx.name, client = %info.client, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::CONNECTIONS
                .with_label_values(&[&ctx.name, "tls_error"])
                .inc();
            return;
        }
    };
    // RFC 3207 §4.2: the client must EHLO again; nothing from before the handshake survives.
    info.tls = true;
    info.helo = None;
    info.esmtp = false;
    // A second STARTTLS inside TLS is refused by the session, so this cannot recurse.
    let _ = Session::new(tls, ctx, info, shutdown).run(greet).await;
}
