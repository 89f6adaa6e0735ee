//! The delivery worker of one policy: leases domain entries from the queue, delivers each over
//! SMTP (MX or relay), and ends every lease with ack or defer.
//!
//! Per lease: a bounce request or an expired entry skips delivery; otherwise the route is
//! resolved (MX with preference order, or the relay), hosts are tried in order until one takes
//! the transaction (connection errors and failures before MAIL move on to the next address),
//! and each recipient gets a [`RecipientOutcome`]. [`decide`] turns them into ack or defer.
//! Recipients that failed permanently get one DSN per domain entry (a message with failures at
//! two destination domains produces two reports, each listing its own recipients), queued
//! **before** the lease is acked, so a crash between the two sends the report twice rather
//! than never. A message from the null sender is never reported on. While a delivery
//! runs, the lease is extended every third of the lease time.
//!
//! Connections are reused: after a transaction a usable connection goes back to a pool keyed
//! by host name and port, for up to `maxMessagesPerConnection` messages; pooled connections
//! idle longer than `timeouts.idle` are closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom_config::{DeliveryPolicySpec, OutboundTlsMode};
use mailroom_queue::{Lease, LeaseRequest, Queue, QueueError, Recipient, Retry, now_ms};
use mailroom_telemetry::DeliveryLog;
use serde_json::{Map, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{
    ClientConfig, ClientError, Connection, Credentials, SendOutcome, Stage, Target, TlsPolicy,
    TlsRoots, Transaction,
};
use crate::dkim::DkimSigner;
use crate::metrics;
use crate::mx::{MxResolver, ResolverConfig};
use crate::outcome::{Disposition, RecipientOutcome, all, decide};
use crate::pool::{Conn, Pool};
use crate::rules::Rules;

mod report;
use crate::shaping::{Destination, SLOT_TTL, ShapingStore};

/// Most entries asked for in one lease call.
const LEASE_BATCH: usize = 64;
/// How long one lease call waits for work.
const LEASE_WAIT: Duration = Duration::from_secs(5);
/// Pause after a failed lease call (queue unavailable).
const LEASE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Largest original message returned whole in a bounce.
const MAX_RETURNED_BODY: usize = 256 << 10;

/// What a worker needs besides its policy.
#[derive(Clone)]
pub struct WorkerDeps {
    /// The queue to take entries from (and to put bounces in).
    pub queue: Arc<dyn Queue>,
    /// The JSON delivery log.
    pub delivery_log: DeliveryLog,
    /// Our host name: EHLO (unless the policy sets `heloName`), bounces, Reporting-MTA.
    pub hostname: String,
    /// The queue's lease time; the worker extends running deliveries every third of it.
    pub lease_time: Duration,
    /// Where traffic-shaping state lives: [`crate::shaping::MemoryStore`] for one process,
    /// [`crate::shaping::KvStore`] for a cluster.
    pub shaping: Arc<dyn ShapingStore>,
}

/// A policy that cannot run, with the field to fix.
#[derive(Debug, thiserror::Error)]
#[error("policies[{policy}].{field}: {reason}")]
pub struct WorkerError {
    /// The policy name.
    pub policy: String,
    /// The camelCase field path inside the policy.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Where a policy sends mail.
enum Routing {
    Mx {
        resolver: Box<MxResolver>,
        port: u16,
    },
    Relay {
        host: String,
        port: u16,
    },
}

/// The delivery worker of one policy.
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    spec: DeliveryPolicySpec,
    deps: WorkerDeps,
    routing: Routing,
    client: ClientConfig,
    pool: Pool,
    dkim: DkimSigner,
    rules: Rules,
}

/// What an attempt came to.
enum Step {
    /// Tried: outcomes per recipient.
    Tried(Attempt),
    /// A limit of the destination held it back: leasable again at this time (Unix ms), no
    /// attempt counted.
    Postpone(u64),
}

/// Where one attempt ended up, for the delivery log and DSNs.
#[derive(Default)]
struct Attempt {
    outcomes: Vec<(Recipient, RecipientOutcome)>,
    host: Option<String>,
    addr: Option<SocketAddr>,
    tls: Option<String>,
    /// The destination's shaping key, when routing got that far.
    dest: Option<String>,
}

impl Attempt {
    fn everyone(recipients: &[Recipient], outcome: RecipientOutcome) -> Attempt {
        Attempt {
            outcomes: all(recipients, &outcome),
            ..Attempt::default()
        }
    }
}

impl Worker {
    /// Prepares the worker of `spec`: the resolver (MX) or the relay settings, TLS roots,
    /// relay credentials. Errors name the policy field to fix.
    pub fn new(spec: &DeliveryPolicySpec, deps: WorkerDeps) -> Result<Worker, WorkerError> {
        let (routing, client, dkim) = prepare(spec, &deps.hostname)?;
        let rules = Rules::new(&spec.rules).map_err(|reason| WorkerError {
            policy: spec.name.clone(),
            field: "rules",
            reason,
        })?;
        let pool = Pool::new(Arc::clone(&deps.shaping));
        Ok(Worker {
            inner: Arc::new(Inner {
                spec: spec.clone(),
                deps,
                routing,
                client,
                pool,
                dkim,
                rules,
            }),
        })
    }

    /// Checks what [`Worker::new`] reads (relay password and CA files, the resolver settings)
    /// without running anything: for `mailroom check`.
    pub fn check(spec: &DeliveryPolicySpec, hostname: &str) -> Result<(), WorkerError> {
        prepare(spec, hostname).map(|_| ())
    }

    /// The policy's name.
    pub fn policy(&self) -> &str {
        &self.inner.spec.name
    }

    /// Delivers until `stop`; then finishes running deliveries for up to `grace` (leases of
    /// those still running after that are handed out again by the queue).
    pub async fn run(self, stop: CancellationToken, grace: Duration) {
        let inner = self.inner;
        let permits = Arc::new(Semaphore::new(inner.spec.concurrency.max(1) as usize));
        let tracker = TaskTracker::new();
        let idle = inner.spec.timeouts.idle.as_duration();
        let reaper = {
            let inner = Arc::clone(&inner);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut refreshed = Instant::now();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {
                            inner.pool.reap(idle);
                            if refreshed.elapsed() >= SLOT_TTL / 3 {
                                inner.pool.refresh().await;
                                refreshed = Instant::now();
                            }
                        }
                    }
                }
            })
        };
        tracing::info!(policy = %inner.spec.name, concurrency = inner.spec.concurrency, "delivery worker started");
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let mut held = vec![first];
            while held.len() < LEASE_BATCH {
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let request = LeaseRequest::new(inner.spec.name.clone(), held.len(), LEASE_WAIT)
                .max_age(inner.spec.retry.max_age.as_duration());
            let leased = tokio::select! {
                _ = stop.cancelled() => break,
                r = inner.deps.queue.lease(&request) => r,
            };
            match leased {
                Ok(leases) => {
                    for (lease, permit) in leases.into_iter().zip(held) {
                        let inner = Arc::clone(&inner);
                        tracker.spawn(async move {
                            inner.handle(lease).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(policy = %inner.spec.name, error = %e, "lease failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(LEASE_ERROR_PAUSE) => {}
                    }
                }
            }
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(policy = %inner.spec.name, "deliveries still running after the grace period; their entries will be delivered again");
        }
        reaper.abort();
        inner.pool.reap(Duration::ZERO);
        tracing::info!(policy = %inner.spec.name, "delivery worker stopped");
    }
}

/// The routing and client settings of `spec`; errors name the policy field to fix.
fn prepare(
    spec: &DeliveryPolicySpec,
    hostname: &str,
) -> Result<(Routing, ClientConfig, DkimSigner), WorkerError> {
    let err = |field: &'static str, reason: String| WorkerError {
        policy: spec.name.clone(),
        field,
        reason,
    };
    let helo = spec
        .helo_name
        .clone()
        .unwrap_or_else(|| hostname.to_string());
    let mut client = ClientConfig::new(helo);
    client.timeouts = (&spec.timeouts).into();
    let routing = match &spec.routing.relay {
        Some(relay) => {
            client.tls = relay.tls.into();
            client.verify_certificates = relay.verify_certificate;
            client.roots = match &relay.ca_file {
                Some(path) => TlsRoots::from_pem_file(std::path::Path::new(path))
                    .map_err(|e| err("routing.relay.caFile", e.to_string()))?,
                None => system_roots(),
            };
            if let (Some(user), Some(file)) = (&relay.user, &relay.password_file) {
                let password = std::fs::read_to_string(file)
                    .map_err(|e| err("routing.relay.passwordFile", format!("{file}: {e}")))?;
                client.credentials = Some(Credentials::new(
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                ));
            }
            Routing::Relay {
                host: relay.host.clone(),
                port: relay.port,
            }
        }
        None => {
            client.tls = spec.tls.into();
            if spec.tls == OutboundTlsMode::Required {
                client.roots = system_roots();
            }
            let mut nameservers = Vec::new();
            for ns in &spec.resolver.nameservers {
                nameservers.push(
                    ns.parse::<SocketAddr>()
                        .map_err(|e| err("resolver.nameservers", format!("{ns}: {e}")))?,
                );
            }
            let config = ResolverConfig {
                nameservers,
                ip_version: spec.resolver.ip_version,
                allow_private: spec.allow_private_destinations,
                ..ResolverConfig::default()
            };
            let resolver = MxResolver::new(config).map_err(|e| err("resolver", e.to_string()))?;
            Routing::Mx {
                resolver: Box::new(resolver),
                port: spec.mx_port,
            }
        }
    };
    let dkim = DkimSigner::new(&spec.name, &spec.dkim).map_err(|e| WorkerError {
        policy: spec.name.clone(),
        field: "dkim",
        reason: e.to_string(),
    })?;
    Ok((routing, client, dkim))
}

/// The system's trust anchors, or none (then `Required` TLS fails to verify, visibly).
fn system_roots() -> TlsRoots {
    TlsRoots::system().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no system CA certificates; TLS verification will fail");
        TlsRoots::default()
    })
}

impl Inner {
    /// One lease, from attempt to ack or defer.
    async fn handle(&self, lease: Lease) {
        let started = Instant::now();
        let attempt = {
            let run = self.attempt(&lease);
            tokio::pin!(run);
            let every = (self.deps.lease_time / 3).max(Duration::from_millis(100));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    a = &mut run => break a,
                    _ = tick.tick() => {
                        if let Err(e) = self.deps.queue.extend(&lease).await {
                            tracing::warn!(entry = %lease.key, error = %e, "could not extend the lease");
                        }
                    }
                }
            }
        };
        metrics::ATTEMPT_SECONDS
            .with_label_values(&[&self.spec.name])
            .observe(started.elapsed().as_secs_f64());
        let key = lease.key.clone();
        let finished = match attempt {
            Step::Tried(attempt) => {
                self.apply_rules(&lease, &attempt).await;
                self.finish(lease, attempt).await
            }
            Step::Postpone(at_ms) => {
                metrics::RECIPIENTS
                    .with_label_values(&[self.spec.name.as_str(), "throttled"])
                    .inc_by(lease.message.envelope.recipients.len() as u64);
                self.deps.queue.postpone(lease, at_ms).await
            }
        };
        if let Err(e) = finished {
            // Not acked: the queue hands the entry out again after the lease time.
            tracing::error!(entry = %key, error = %e, "could not record the outcome; the entry will be delivered again");
        }
    }

    /// Tries to deliver the lease's recipients.
    async fn attempt(&self, lease: &Lease) -> Step {
        let recipients = &lease.message.envelope.recipients;
        if let Some(reason) = &lease.state.bounce_requested {
            return Step::Tried(Attempt::everyone(
                recipients,
                RecipientOutcome::Permanent {
                    response: format!("returned to the sender by the postmaster: {reason}"),
                    status: (5, 0, 0),
                },
            ));
        }
        if lease.expired {
            let last = lease
                .state
                .last_response
                .clone()
                .unwrap_or_else(|| "no delivery attempt succeeded".into());
            return Step::Tried(Attempt::everyone(
                recipients,
                RecipientOutcome::Transient { response: last },
            ));
        }
        match &self.routing {
            Routing::Relay { host, port } => {
                let addrs = match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => addrs.collect::<Vec<_>>(),
                    Err(e) => {
                        return Step::Tried(Attempt::everyone(
                            recipients,
                            RecipientOutcome::Transient {
                                response: format!("relay {host}:{port}: cannot resolve: {e}"),
                            },
                        ));
                    }
                };
                let targets = addrs
                    .into_iter()
                    .map(|a| Target::new(a.ip(), a.port(), host.clone()));
                let dest = Destination::of(&self.spec, &lease.key.domain, &[]);
                self.shaped(lease, targets.collect(), &dest).await
            }
            Routing::Mx { resolver, port } => match resolver.resolve(&lease.key.domain).await {
                Ok(route) => {
                    let hosts: Vec<&str> = route.hosts.iter().map(|h| h.name.as_str()).collect();
                    let dest = Destination::of(&self.spec, &lease.key.domain, &hosts);
                    let targets = route
                        .addresses()
                        .map(|(host, ip)| Target::new(ip, *port, host.name.clone()))
                        .collect();
                    self.shaped(lease, targets, &dest).await
                }
                Err(e) if e.is_permanent() => Step::Tried(Attempt::everyone(
                    recipients,
                    RecipientOutcome::Permanent {
                        response: e.to_string(),
                        status: parse_status(e.enhanced_status()).unwrap_or((5, 4, 4)),
                    },
                )),
                Err(e) => Step::Tried(Attempt::everyone(
                    recipients,
                    RecipientOutcome::Transient {
                        response: e.to_string(),
                    },
                )),
            },
        }
    }

    /// Applies the destination's message rate, then delivers.
    async fn shaped(&self, lease: &Lease, targets: Vec<Target>, dest: &Destination) -> Step {
        if let Some(at) = self.rules.gate(self.pool.shaper(), &dest.key).await {
            return Step::Postpone(at);
        }
        match self.deliver_via(lease, targets, dest).await {
            Step::Tried(mut attempt) => {
                attempt.dest = Some(dest.key.clone());
                Step::Tried(attempt)
            }
            other => other,
        }
    }

    /// Tries `targets` in order until one takes the transaction.
    async fn deliver_via(&self, lease: &Lease, targets: Vec<Target>, dest: &Destination) -> Step {
        let recipients = &lease.message.envelope.recipients;
        let mut last: Option<ClientError> = None;
        for target in targets {
            let key = format!("{}:{}", target.host, target.addr.port());
            let pooled = self.pool.take(&key, self.spec.timeouts.idle.as_duration());
            let was_pooled = pooled.is_some();
            let conn = match pooled {
                Some(conn) => conn,
                None => match self.open(&target, dest).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) if e.try_next_host() => {
                        tracing::info!(entry = %lease.key, host = %target.host, addr = %target.addr, error = %e, "trying the next host");
                        last = Some(e);
                        continue;
                    }
                    Ok(Err(e)) => {
                        return Step::Tried(Attempt {
                            host: Some(target.host.clone()),
                            addr: Some(target.addr),
                            ..Attempt::everyone(recipients, classify(&e))
                        });
                    }
                    Err(at) => return Step::Postpone(at),
                },
            };
            if !was_pooled && let Some(name) = self.loops_back(&conn.conn) {
                self.pool.close(conn);
                return Step::Tried(Attempt {
                    host: Some(target.host.clone()),
                    addr: Some(target.addr),
                    ..Attempt::everyone(
                        recipients,
                        RecipientOutcome::Permanent {
                            response: format!(
                                "mail for {} loops back to myself ({} at {} greets as {name})",
                                lease.key.domain, target.host, target.addr
                            ),
                            status: (5, 4, 6),
                        },
                    )
                });
            }
            // The message rate is taken only with a connection in hand, so that an entry
            // held back by the connection limit does not use up rate.
            if let Some(at) = self.message_rate(dest).await {
                self.pool.put(key, conn);
                return Step::Postpone(at);
            }
            let sent = match self.send(lease, conn, key.clone()).await {
                // The server closed the idle connection meanwhile (its own idle timeout,
                // often with a 421): nothing was sent; go again on a fresh connection.
                Err(e) if was_pooled && closed_before_mail(&e) => {
                    tracing::debug!(host = %target.host, error = %e, "pooled connection was closed by the server; reconnecting");
                    match self.open(&target, dest).await {
                        Ok(Ok(conn)) => self.send(lease, conn, key).await,
                        Ok(Err(e)) => Err(e),
                        Err(at) => return Step::Postpone(at),
                    }
                }
                other => other,
            };
            match sent {
                Err(e) if e.try_next_host() => {
                    tracing::info!(entry = %lease.key, host = %target.host, addr = %target.addr, error = %e, "trying the next host");
                    last = Some(e);
                    continue;
                }
                Err(e) => {
                    return Step::Tried(Attempt {
                        host: Some(target.host.clone()),
                        addr: Some(target.addr),
                        ..Attempt::everyone(recipients, classify(&e))
                    });
                }
                Ok((outcome, tls)) => {
                    let outcomes = recipients
                        .iter()
                        .cloned()
                        .zip(outcome.recipients.iter().map(|r| {
                            RecipientOutcome::from_reply(
                                r.reply.code,
                                r.reply.enhanced.map(|e| (e.0, e.1, e.2)),
                                r.response(),
                            )
                        }))
                        .collect();
                    return Step::Tried(Attempt {
                        outcomes,
                        host: Some(target.host.clone()),
                        addr: Some(target.addr),
                        tls,
                        dest: None,
                    });
                }
            }
        }
        let response = last.map_or_else(
            || format!("{}: no host to deliver to", lease.key.domain),
            |e| e.to_string(),
        );
        Step::Tried(Attempt::everyone(
            recipients,
            RecipientOutcome::Transient { response },
        ))
    }

    /// The server's name when it is this system's own (its EHLO greeting names our host name
    /// or HELO name): delivering there would loop (RFC 5321 §5.1).
    fn loops_back(&self, conn: &Connection) -> Option<String> {
        let banner = &conn.capabilities().banner;
        let name = banner.split_whitespace().next()?.trim_end_matches('.');
        let ours = [self.deps.hostname.as_str(), self.client.helo_name.as_str()];
        ours.iter()
            .any(|o| o.eq_ignore_ascii_case(name))
            .then(|| name.to_string())
    }

    /// Takes one unit of the destination's message rate: `None` to go on, `Some(at)` when the
    /// rate says not before `at` (Unix ms).
    async fn message_rate(&self, dest: &Destination) -> Option<u64> {
        let rate = dest.limits.rate.as_ref()?;
        match self
            .pool
            .shaper()
            .take(&format!("msg:{}", dest.key), rate)
            .await
        {
            Ok(Ok(())) => None,
            Ok(Err(wait)) => Some(later(wait)),
            Err(e) => {
                tracing::warn!(error = %e, "rate check failed; trying again shortly");
                Some(later(Duration::from_secs(1)))
            }
        }
    }

    /// Opens a connection to `target` within the destination's limits: a connection slot
    /// (`maxConnections`) and the connection rate. `Err(at)`: a limit says not now (postpone
    /// to `at`, Unix ms); `Ok(Err(_))`: the connection failed.
    async fn open(
        &self,
        target: &Target,
        dest: &Destination,
    ) -> Result<Result<Conn, ClientError>, u64> {
        let shaper = self.pool.shaper();
        let slot = match dest.limits.max_connections {
            None => None,
            Some(max) => {
                // All slots busy: wait a little for one (connections close all the time under
                // load), then give the entry back to the queue for a while.
                let give_up = Instant::now() + shaper.slot_wait();
                loop {
                    match self.pool.acquire(&dest.key, max).await {
                        Ok(Some(hold)) => break Some(hold),
                        Ok(None) if Instant::now() < give_up => {
                            tokio::time::sleep(jitter(shaper.slot_poll())).await;
                        }
                        Ok(None) => return Err(later(jitter(Duration::from_millis(500)))),
                        Err(e) => {
                            tracing::warn!(error = %e, "connection slot unavailable; trying again shortly");
                            return Err(later(Duration::from_secs(1)));
                        }
                    }
                }
            }
        };
        if let Some(rate) = &dest.limits.connection_rate {
            let wait = match shaper.take(&format!("conn:{}", dest.key), rate).await {
                Ok(Ok(())) => None,
                Ok(Err(wait)) => Some(wait),
                Err(e) => {
                    tracing::warn!(error = %e, "connection rate check failed; trying again shortly");
                    Some(Duration::from_secs(1))
                }
            };
            if let Some(wait) = wait {
                if let Some(hold) = slot {
                    self.pool.release(hold);
                }
                return Err(later(wait));
            }
        }
        let max_messages = dest
            .limits
            .max_messages_per_connection
            .unwrap_or(self.spec.max_messages_per_connection);
        match self.connect(target, dest).await {
            Ok(conn) => Ok(Ok(Conn {
                conn,
                slot,
                max_messages,
            })),
            Err(e) => {
                if let Some(hold) = slot {
                    self.pool.release(hold);
                }
                Ok(Err(e))
            }
        }
    }

    /// Connects with the destination's TLS mode (for MX delivery; a relay keeps its own);
    /// under opportunistic TLS a failed handshake is retried once in plaintext (as Postfix's
    /// `may` level does).
    async fn connect(
        &self,
        target: &Target,
        dest: &Destination,
    ) -> Result<Connection, ClientError> {
        let overridden;
        let config = match (dest.tls, &self.routing) {
            (Some(mode), Routing::Mx { .. }) if TlsPolicy::from(mode) != self.client.tls => {
                let mut c = self.client.clone();
                c.tls = mode.into();
                if mode == OutboundTlsMode::Required && c.roots.is_empty() {
                    c.roots = system_roots();
                }
                overridden = c;
                &overridden
            }
            _ => &self.client,
        };
        let result = match Connection::connect(target, config).await {
            Err(ClientError::Tls { .. }) if config.tls == TlsPolicy::Opportunistic => {
                tracing::info!(host = %target.host, addr = %target.addr, "STARTTLS failed; retrying without TLS (opportunistic)");
                let mut plain = config.clone();
                plain.tls = TlsPolicy::Disabled;
                Connection::connect(target, &plain).await
            }
            other => other,
        };
        if result.is_ok() {
            metrics::CONNECTIONS_OPEN.inc();
        }
        result
    }

    /// Sends the lease's message over `conn`; a usable connection goes back to the pool.
    async fn send(
        &self,
        lease: &Lease,
        mut conn: Conn,
        key: String,
    ) -> Result<(SendOutcome, Option<String>), ClientError> {
        let tx = Transaction::from_envelope(&lease.message.envelope);
        let result = match self.signed(lease) {
            Some(signed) => conn.conn.send(&tx, &signed).await,
            None => conn.conn.send(&tx, &lease.message.body).await,
        };
        let tls = conn
            .conn
            .tls_info()
            .map(|t| format!("{} {}", t.protocol, t.cipher_suite));
        if conn.conn.is_usable()
            && conn.conn.messages_sent() < conn.max_messages
            && conn.conn.reset().await.is_ok()
        {
            self.pool.put(key, conn);
        } else {
            self.pool.close(conn);
        }
        result.map(|o| (o, tls))
    }

    /// Puts a rule in force when one matches a reply of this attempt.
    async fn apply_rules(&self, lease: &Lease, attempt: &Attempt) {
        let Some(dest) = &attempt.dest else { return };
        let responses = attempt.outcomes.iter().filter_map(|(_, o)| match o {
            RecipientOutcome::Delivered { .. } => None,
            other => Some(other.response()),
        });
        if let Some(over) = self
            .rules
            .observe(self.pool.shaper(), dest, responses)
            .await
        {
            let mut fields = Map::new();
            fields.insert("policy".into(), json!(self.spec.name));
            fields.insert("destination".into(), json!(over.dest));
            fields.insert("rule".into(), json!(over.rule));
            fields.insert(
                "action".into(),
                json!(if over.rate.is_some() {
                    "throttle"
                } else {
                    "suspend"
                }),
            );
            fields.insert("rate".into(), json!(over.rate));
            fields.insert("until_ms".into(), json!(over.until_ms));
            fields.insert("response".into(), json!(over.response));
            fields.insert("queue_id".into(), json!(lease.key.id.to_string()));
            self.deps.delivery_log.record("rule", fields);
            tracing::info!(destination = %over.dest, rule = %over.rule, "rule in force");
        }
    }

    /// The message with its DKIM signature prepended, when a key applies.
    fn signed(&self, lease: &Lease) -> Option<Vec<u8>> {
        if !self.dkim.signs() {
            return None;
        }
        match self.dkim.sign(&lease.message.body) {
            Ok(Some(header)) => {
                let mut out = Vec::with_capacity(header.len() + lease.message.body.len());
                out.extend_from_slice(&header);
                out.extend_from_slice(&lease.message.body);
                Some(out)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(entry = %lease.key, error = %e, "DKIM signing failed; sending unsigned");
                None
            }
        }
    }

    /// Logs, bounces, and acks or defers.
    async fn finish(&self, lease: Lease, attempt: Attempt) -> Result<(), QueueError> {
        let now = now_ms();
        let expired = lease.expired;
        let mut delivered = 0;
        for (recipient, outcome) in &attempt.outcomes {
            if let RecipientOutcome::Delivered { response } = outcome {
                delivered += 1;
                self.log(
                    "delivery",
                    &lease,
                    recipient,
                    response,
                    &attempt,
                    Map::new(),
                );
            }
        }
        metrics::RECIPIENTS
            .with_label_values(&[&self.spec.name, "delivered"])
            .inc_by(delivered);
        match decide(attempt.outcomes.clone(), expired) {
            Disposition::Done { bounced } => {
                self.bounce(&lease, &bounced, &attempt, expired, now)
                    .await?;
                self.deps.queue.ack(lease).await
            }
            Disposition::Retry {
                pending,
                response,
                bounced,
            } => {
                self.bounce(&lease, &bounced, &attempt, false, now).await?;
                self.warn_if_delayed(
                    &lease,
                    &pending,
                    &response,
                    &attempt,
                    now,
                    lease.expires_at_ms,
                )
                .await?;
                let wait = self.spec.retry.delay_after(lease.state.attempts + 1);
                let at_ms = now + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                let next = lease.expires_at_ms.map_or(at_ms, |e| at_ms.min(e));
                for r in &pending {
                    let mut extra = Map::new();
                    extra.insert("attempts".into(), json!(lease.state.attempts + 1));
                    extra.insert("next_attempt_ms".into(), json!(next));
                    self.log("transient_failure", &lease, r, &response, &attempt, extra);
                }
                metrics::RECIPIENTS
                    .with_label_values(&[&self.spec.name, "deferred"])
                    .inc_by(pending.len() as u64);
                // Policy status shows it: why this destination's mail waits.
                if let Some(dest) = &attempt.dest {
                    let error = crate::shaping::LastError::now(dest, &response);
                    if let Err(e) = self.pool.shaper().record_error(&error).await {
                        tracing::debug!(%dest, error = %e, "could not record the last error");
                    }
                }
                self.deps
                    .queue
                    .defer(
                        lease,
                        Retry {
                            at_ms,
                            recipients: pending,
                            response,
                        },
                    )
                    .await
            }
        }
    }
}

/// True when a reused connection turned out closed at the first command of the transaction.
fn closed_before_mail(e: &ClientError) -> bool {
    match e {
        ClientError::Closed { stage, .. } | ClientError::Io { stage, .. } => *stage == Stage::Mail,
        ClientError::UnexpectedReply { stage, reply, .. } => {
            *stage == Stage::Mail && reply.code == 421
        }
        _ => false,
    }
}

/// The outcome of a transaction-level client error for every recipient.
fn classify(e: &ClientError) -> RecipientOutcome {
    if e.is_permanent() {
        let s = e.status();
        RecipientOutcome::Permanent {
            response: e.to_string(),
            status: (s.0, s.1, s.2),
        }
    } else {
        RecipientOutcome::Transient {
            response: e.to_string(),
        }
    }
}

/// Unix ms `wait` from now.
pub(crate) fn later(wait: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
}

/// `base` plus up to as much again, at random.
fn jitter(base: Duration) -> Duration {
    use rand::Rng;
    base + base.mul_f64(rand::rng().random_range(0.0..1.0))
}

/// `"5.1.10"` -> `(5, 1, 10)`.
fn parse_status(s: &str) -> Option<(u8, u16, u16)> {
    let mut parts = s.split('.');
    let class = parts.next()?.parse().ok()?;
    let subject = parts.next()?.parse().ok()?;
    let detail = parts.next()?.parse().ok()?;
    Some((class, subject, detail))
}
