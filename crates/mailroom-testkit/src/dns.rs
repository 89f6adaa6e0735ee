//! An authoritative DNS server for tests: hickory-server in-process, on 127.0.0.1 (UDP and TCP on
//! the same free port), answering from an in-memory [`Zone`]; stopped on drop.
//!
//! Used by the outbound MX resolver tests (and anything else that resolves names) so that no
//! test reaches beyond this machine. The server runs on a tokio runtime of its own thread, so it
//! works the same from `#[test]` and `#[tokio::test]` functions.
//!
//! All records live in one zone at the root (`.`): every name you configure is answered, a name
//! that has no records gets NXDOMAIN (NOERROR with no answers when it has records of other types,
//! or names below it), and there are no delegations. Names are written without the trailing dot
//! and may use U-labels (`bücher.test` is served as `xn--bcher-kva.test`).
//!
//! ```no_run
//! # fn main() -> Result<(), mailroom_testkit::TestkitError> {
//! use mailroom_testkit::{DnsServer, Zone};
//!
//! let dns = DnsServer::start(
//!     Zone::new()
//!         .mx("example.test", 10, "mx1.example.test")
//!         .a("mx1.example.test", "127.0.0.2")
//!         .null_mx("nullmx.test"),
//! )?;
//! let nameserver = dns.addr(); // 127.0.0.1:<port>, UDP and TCP
//! dns.set_zone(Zone::new().a("example.test", "127.0.0.3"))?; // replaces every record
//! # let _ = nameserver;
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, mpsc};
use std::thread;
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AxfrPolicy, Catalog, MessageResponseBuilder, ZoneHandler, ZoneType,
};
use tokio::sync::oneshot;

use crate::error::{Result, TestkitError};

/// TTL of records (and of negative answers) unless [`Zone::ttl`] says otherwise.
pub const DEFAULT_TTL: u32 = 60;
/// How often start binds a new UDP port when TCP cannot get the same port number.
const BIND_ATTEMPTS: usize = 32;
/// An idle TCP client connection is closed after this long.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// How long drop waits for in-flight requests to finish.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Longest character-string in a TXT record (RFC 1035 §3.3).
const TXT_CHUNK: usize = 255;
/// Serial of the zone's SOA (never transferred, so it never changes).
const SERIAL: u32 = 1;

/// The records a [`DnsServer`] serves, built with chained calls.
///
/// Invalid input (a name that is not a domain name, an address that does not parse, a CNAME next
/// to other data) is collected and reported by [`DnsServer::start`] / [`DnsServer::set_zone`]
/// as [`TestkitError::InvalidOption`], so a builder chain never panics.
#[derive(Debug, Clone)]
pub struct Zone {
    ttl: u32,
    records: Vec<(Name, RData)>,
    servfail: Vec<Name>,
    errors: Vec<String>,
}

impl Default for Zone {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            records: Vec::new(),
            servfail: Vec::new(),
            errors: Vec::new(),
        }
    }
}

impl Zone {
    /// An empty zone: every query gets NXDOMAIN.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// TTL in seconds for every record and for negative answers (SOA minimum); default 60.
    /// Use `0` when a test changes records with [`DnsServer::set_zone`] while a caching resolver
    /// is alive.
    #[must_use]
    pub fn ttl(mut self, seconds: u32) -> Self {
        self.ttl = seconds;
        self
    }

    /// `name MX preference exchange`.
    #[must_use]
    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Self {
        match parse_name(exchange) {
            Ok(exchange) => self.record(name, RData::MX(MX::new(preference, exchange))),
            Err(e) => self.error(format!("MX {name} {preference} {exchange}: {e}")),
        }
    }

    /// A null MX (RFC 7505): `name MX 0 .`.
    #[must_use]
    pub fn null_mx(self, name: &str) -> Self {
        self.record(name, RData::MX(MX::new(0, Name::root())))
    }

    /// `name A addr`; `addr` is anything that displays as an IPv4 address (`"127.0.0.2"`,
    /// an [`Ipv4Addr`]).
    #[must_use]
    pub fn a(self, name: &str, addr: impl fmt::Display) -> Self {
        let text = addr.to_string();
        match text.parse::<Ipv4Addr>() {
            Ok(ip) => self.record(name, RData::A(A(ip))),
            Err(e) => self.error(format!("A {name} {text}: {e}")),
        }
    }

    /// `name AAAA addr`; `addr` is anything that displays as an IPv6 address (`"::1"`, an
    /// [`Ipv6Addr`]).
    #[must_use]
    pub fn aaaa(self, name: &str, addr: impl fmt::Display) -> Self {
        let text = addr.to_string();
        match text.parse::<Ipv6Addr>() {
            Ok(ip) => self.record(name, RData::AAAA(AAAA(ip))),
            Err(e) => self.error(format!("AAAA {name} {text}: {e}")),
        }
    }

    /// `name A` or `name AAAA`, by the address family of `addr`.
    #[must_use]
    pub fn ip(self, name: &str, addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(v4) => self.a(name, v4),
            IpAddr::V6(v6) => self.aaaa(name, v6),
        }
    }

    /// `name CNAME target` (the only record allowed at `name`).
    #[must_use]
    pub fn cname(self, name: &str, target: &str) -> Self {
        match parse_name(target) {
            Ok(target) => self.record(name, RData::CNAME(CNAME(target))),
            Err(e) => self.error(format!("CNAME {name} {target}: {e}")),
        }
    }

    /// `name TXT "text"` (split into 255-byte character-strings as needed).
    #[must_use]
    pub fn txt(self, name: &str, text: &str) -> Self {
        self.record(name, RData::TXT(TXT::new(txt_chunks(text))))
    }

    /// Every query for exactly `name` (any type) is answered with SERVFAIL, whatever records it
    /// has: a broken authoritative server, for testing temporary DNS failures.
    #[must_use]
    pub fn servfail(mut self, name: &str) -> Self {
        match parse_name(name) {
            Ok(n) => self.servfail.push(n),
            Err(e) => self.errors.push(format!("SERVFAIL {name}: {e}")),
        }
        self
    }

    fn record(mut self, name: &str, rdata: RData) -> Self {
        match parse_name(name) {
            Ok(n) => self.records.push((n, rdata)),
            Err(e) => self
                .errors
                .push(format!("{} {name}: {e}", rdata.record_type())),
        }
        self
    }

    fn error(mut self, message: String) -> Self {
        self.errors.push(message);
        self
    }

    /// The catalog and fault list that the request handler serves.
    fn build(&self) -> Result<Served> {
        if !self.errors.is_empty() {
            return Err(invalid_zone(self.errors.join("; ")));
        }
        let origin = Name::root();
        let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let soa = SOA::new(
            parse_name("ns.testkit.invalid").map_err(invalid_zone)?,
            parse_name("hostmaster.testkit.invalid").map_err(invalid_zone)?,
            SERIAL,
            3600,
            600,
            86_400,
            self.ttl,
        );
        let records =
            std::iter::once((origin.clone(), RData::SOA(soa))).chain(self.records.iter().cloned());
        for (name, rdata) in records {
            let what = format!("{} {name}", rdata.record_type());
            if !zone.upsert_mut(Record::from_rdata(name, self.ttl, rdata), SERIAL) {
                return Err(invalid_zone(format!(
                    "{what}: rejected (a CNAME cannot share its name with other records)"
                )));
            }
        }
        let mut catalog = Catalog::new();
        let handlers: Vec<Arc<dyn ZoneHandler>> = vec![Arc::new(zone)];
        catalog.upsert(LowerName::from(origin), handlers);
        Ok(Served {
            catalog,
            servfail: self.servfail.iter().map(LowerName::from).collect(),
        })
    }
}

/// A domain name as written in a test (`example.test`, `bücher.test`, `_mta-sts.example.test`),
/// made absolute.
fn parse_name(text: &str) -> std::result::Result<Name, String> {
    let mut name = Name::from_str_relaxed(text.trim_end_matches('.'))
        .map_err(|e| format!("not a domain name: {e}"))?
        .to_lowercase();
    name.set_fqdn(true);
    Ok(name)
}

fn txt_chunks(text: &str) -> Vec<String> {
    let mut chunks = vec![String::new()];
    for c in text.chars() {
        if chunks
            .last()
            .is_some_and(|s| s.len() + c.len_utf8() > TXT_CHUNK)
        {
            chunks.push(String::new());
        }
        if let Some(last) = chunks.last_mut() {
            last.push(c);
        }
    }
    chunks
}

fn invalid_zone(reason: String) -> TestkitError {
    TestkitError::InvalidOption(format!("DNS zone: {reason}"))
}

/// What the server answers from right now; swapped whole by [`DnsServer::set_zone`].
struct Served {
    catalog: Catalog,
    servfail: HashSet<LowerName>,
}

/// The hickory request handler: counts queries, injects SERVFAIL, else asks the catalog.
struct Handler {
    served: Arc<RwLock<Arc<Served>>>,
    queries: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let served = Arc::clone(&self.served.read().unwrap_or_else(PoisonError::into_inner));
        let fail = request
            .request_info()
            .is_ok_and(|info| served.servfail.contains(info.query.name()));
        if !fail {
            return served
                .catalog
                .handle_request::<R, T>(request, response_handle)
                .await;
        }
        let response = MessageResponseBuilder::new(&request.queries, None)
            .error_msg(&request.metadata, ResponseCode::ServFail);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => {
                let mut header = Header {
                    metadata: request.metadata,
                    counts: HeaderCounts::default(),
                };
                header.metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(header)
            }
        }
    }
}

/// A running authoritative DNS server on `127.0.0.1:<port>` (UDP and TCP).
///
/// Dropping it stops the server and joins its thread.
pub struct DnsServer {
    addr: SocketAddr,
    served: Arc<RwLock<Arc<Served>>>,
    queries: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .field("queries", &self.query_count())
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on the same free port of 127.0.0.1 and serves `zone` from a new thread.
    /// Returns once the server is registered with its runtime, so queries can be sent at once.
    ///
    /// # Errors
    /// [`TestkitError::InvalidOption`] for a bad zone, [`TestkitError::FreePort`] when no port is
    /// free for both UDP and TCP, [`TestkitError::Io`] when the server thread cannot start.
    pub fn start(zone: Zone) -> Result<Self> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), zone)
    }

    /// [`Self::start`] on another local address than 127.0.0.1, e.g. the gateway of a
    /// [`crate::PodNetwork`] so that pods can use it as their nameserver.
    ///
    /// # Errors
    /// See [`Self::start`].
    pub fn start_on(ip: IpAddr, zone: Zone) -> Result<Self> {
        let served = Arc::new(RwLock::new(Arc::new(zone.build()?)));
        let queries = Arc::new(AtomicU64::new(0));
        let (udp, tcp) = bind_same_port(ip)?;
        let addr = udp
            .local_addr()
            .map_err(|source| TestkitError::FreePort { source })?;
        let handler = Handler {
            served: Arc::clone(&served),
            queries: Arc::clone(&queries),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("testkit-dns-{}", addr.port()))
            .spawn(move || serve(udp, tcp, handler, &ready_tx, stop_rx))
            .map_err(|source| start_error(addr, source))?;
        let mut server = Self {
            addr,
            served,
            queries,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(source)) => {
                server.shutdown();
                Err(start_error(addr, source))
            }
            Err(_) => {
                server.shutdown();
                Err(start_error(
                    addr,
                    io::Error::other("the server thread exited during startup"),
                ))
            }
        }
    }

    /// The address to use as the nameserver (127.0.0.1 or the address of [`Self::start_on`],
    /// same port for UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces every record (and the SERVFAIL list) with those of `zone`. Queries already in
    /// flight finish with the old records. Resolvers may still answer from their cache: see
    /// [`Zone::ttl`].
    ///
    /// # Errors
    /// [`TestkitError::InvalidOption`] for a bad zone (the old records stay).
    pub fn set_zone(&self, zone: Zone) -> Result<()> {
        let served = Arc::new(zone.build()?);
        *self.served.write().unwrap_or_else(PoisonError::into_inner) = served;
        Ok(())
    }

    /// Requests received so far, over UDP and TCP (to check that something was, or was not,
    /// looked up, or that a cache was used).
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the thread has ended already.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic in the server thread has been printed already; nothing to add here.
            let _ = thread.join();
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn start_error(addr: SocketAddr, source: io::Error) -> TestkitError {
    TestkitError::Io {
        what: "cannot start the test DNS server on",
        path: PathBuf::from(addr.to_string()),
        source,
    }
}

/// A UDP socket and a TCP listener on the same free port of `ip`, both non-blocking.
fn bind_same_port(ip: IpAddr) -> Result<(UdpSocket, TcpListener)> {
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, "no attempt made");
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind((ip, 0)).map_err(|source| TestkitError::FreePort { source })?;
        let port = udp
            .local_addr()
            .map_err(|source| TestkitError::FreePort { source })?
            .port();
        match TcpListener::bind((ip, port)) {
            Ok(tcp) => {
                udp.set_nonblocking(true)
                    .and_then(|()| tcp.set_nonblocking(true))
                    .map_err(|source| TestkitError::FreePort { source })?;
                return Ok((udp, tcp));
            }
            Err(e) => last = e,
        }
    }
    Err(TestkitError::FreePort { source: last })
}

/// The server thread: a current-thread runtime that runs hickory's `Server` until `stop` fires
/// (or its sender is dropped).
fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    handler: Handler,
    ready: &mpsc::Sender<io::Result<()>>,
    stop: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let sockets = tokio::net::UdpSocket::from_std(udp)
            .and_then(|udp| Ok((udp, tokio::net::TcpListener::from_std(tcp)?)));
        let (udp, tcp) = match sockets {
            Ok(sockets) => sockets,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        // The receiver is gone only when start gave up already; then stop is dropped too.
        let _ = ready.send(Ok(()));
        let _ = stop.await;
        // Errors of individual listeners at shutdown are of no interest to a test.
        let _ = tokio::time::timeout(STOP_GRACE, server.shutdown_gracefully()).await;
    });
    runtime.shutdown_timeout(STOP_GRACE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider as ResolverRuntime;
    use hickory_resolver::net::{DnsError, NetError};
    use hickory_resolver::proto::rr::RecordType;
    use hickory_resolver::{Resolver, TokioResolver};

    /// A resolver that asks only `server`, over UDP (or TCP only, when `tcp_only`).
    fn resolver(server: SocketAddr, tcp_only: bool) -> TokioResolver {
        let mut connections = Vec::new();
        if !tcp_only {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            connections.push(udp);
        }
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = server.port();
        connections.push(tcp);
        let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
            server.ip(),
            true,
            connections,
        )]);
        let mut builder = Resolver::builder_with_config(config, ResolverRuntime::default());
        builder.options_mut().timeout = Duration::from_secs(2);
        builder.options_mut().attempts = 1;
        builder.build().expect("build resolver")
    }

    fn zone() -> Zone {
        Zone::new()
            .mx("example.test", 20, "mx2.example.test")
            .mx("example.test", 10, "mx1.example.test")
            .a("mx1.example.test", "127.0.0.2")
            .aaaa("mx1.example.test", Ipv6Addr::LOCALHOST)
            .a("mx2.example.test", Ipv4Addr::new(127, 0, 0, 3))
            .null_mx("nullmx.test")
            .cname("alias.example.test", "mx1.example.test")
            .txt("example.test", "v=spf1 -all")
            .a("bücher.test", "127.0.0.4")
            .servfail("broken.test")
    }

    fn mx_of(lookup: &hickory_resolver::lookup::Lookup) -> Vec<(u16, String)> {
        let mut mx: Vec<(u16, String)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect();
        mx.sort();
        mx
    }

    fn ips_of(lookup: &hickory_resolver::lookup::Lookup) -> Vec<IpAddr> {
        lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn answers_mx_a_aaaa_cname_txt_and_idna_names() {
        let dns = DnsServer::start(zone()).expect("start dns");
        assert_eq!(dns.addr().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let r = resolver(dns.addr(), false);

        let mx = r.mx_lookup("example.test.").await.expect("mx");
        assert_eq!(
            mx_of(&mx),
            [
                (10, "mx1.example.test.".to_owned()),
                (20, "mx2.example.test.".to_owned())
            ]
        );
        let null = r.mx_lookup("nullmx.test.").await.expect("null mx");
        assert_eq!(mx_of(&null), [(0, ".".to_owned())]);

        let a = r.ipv4_lookup("mx1.example.test.").await.expect("a");
        assert_eq!(ips_of(&a), [IpAddr::from([127, 0, 0, 2])]);
        let aaaa = r.ipv6_lookup("mx1.example.test.").await.expect("aaaa");
        assert_eq!(ips_of(&aaaa), [IpAddr::V6(Ipv6Addr::LOCALHOST)]);

        let via_cname = r.ipv4_lookup("alias.example.test.").await.expect("cname");
        assert_eq!(ips_of(&via_cname), [IpAddr::from([127, 0, 0, 2])]);

        let txt = r.txt_lookup("example.test.").await.expect("txt");
        assert!(
            txt.answers()
                .iter()
                .any(|r| matches!(&r.data, RData::TXT(t) if t.to_string() == "v=spf1 -all")),
            "{txt:?}"
        );

        let idna = r.ipv4_lookup("xn--bcher-kva.test.").await.expect("idna");
        assert_eq!(ips_of(&idna), [IpAddr::from([127, 0, 0, 4])]);
        assert!(dns.query_count() >= 6);
    }

    #[tokio::test]
    async fn nxdomain_nodata_and_servfail() {
        let dns = DnsServer::start(zone()).expect("start dns");
        let r = resolver(dns.addr(), false);

        let err = r.mx_lookup("missing.example.test.").await.expect_err("nx");
        assert!(err.is_nx_domain(), "{err}");
        let err = r.mx_lookup("elsewhere.invalid-tld.").await.expect_err("nx");
        assert!(err.is_nx_domain(), "{err}");

        // mx1 has addresses but no MX: NOERROR without answers.
        let err = r.mx_lookup("mx1.example.test.").await.expect_err("nodata");
        assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err}");

        let err = r
            .lookup("broken.test.", RecordType::MX)
            .await
            .expect_err("servfail");
        assert!(
            matches!(
                err,
                NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn works_from_sync_tests_over_tcp_and_set_zone_replaces_records() {
        let dns = DnsServer::start(zone().ttl(0)).expect("start dns");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let r = runtime.block_on(async { resolver(dns.addr(), true) });
        let ips = |name: &'static str| {
            let r = r.clone();
            runtime.block_on(async move { r.ipv4_lookup(name).await.map(|l| ips_of(&l)) })
        };
        assert_eq!(
            ips("mx2.example.test.").expect("tcp"),
            [IpAddr::from([127, 0, 0, 3])]
        );

        dns.set_zone(Zone::new().ttl(0).a("mx2.example.test", "127.0.0.9"))
            .expect("set zone");
        assert_eq!(
            ips("mx2.example.test.").expect("new record"),
            [IpAddr::from([127, 0, 0, 9])]
        );
        assert!(ips("mx1.example.test.").expect_err("gone").is_nx_domain());

        let bad = dns.set_zone(Zone::new().a("x.test", "not-an-ip"));
        assert!(
            matches!(&bad, Err(TestkitError::InvalidOption(m)) if m.contains("not-an-ip")),
            "{bad:?}"
        );
    }

    #[test]
    fn invalid_zones_are_rejected_at_start() {
        let err = DnsServer::start(Zone::new().aaaa("x.test", "127.0.0.1")).expect_err("v4");
        assert!(err.to_string().contains("AAAA x.test 127.0.0.1"), "{err}");
        let err = DnsServer::start(
            Zone::new()
                .cname("alias.test", "x.test")
                .a("alias.test", "127.0.0.1"),
        )
        .expect_err("cname and a");
        assert!(err.to_string().contains("CNAME"), "{err}");
        let err = DnsServer::start(Zone::new().mx("x.test", 10, "bad..name")).expect_err("name");
        assert!(err.to_string().contains("bad..name"), "{err}");
    }

    #[test]
    fn drop_stops_the_server_and_frees_the_port() {
        let dns = DnsServer::start(Zone::new()).expect("start dns");
        let addr = dns.addr();
        drop(dns);
        let udp = UdpSocket::bind(addr).expect("udp port free again");
        let tcp = TcpListener::bind(addr).expect("tcp port free again");
        drop((udp, tcp));
    }

    #[test]
    fn long_txt_is_split_into_character_strings() {
        let text = "a".repeat(600);
        let chunks = txt_chunks(&text);
        assert_eq!(
            chunks.iter().map(String::len).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert_eq!(txt_chunks(""), [""]);
    }
}
