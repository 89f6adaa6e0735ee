//! MX resolution against a real (in-process, loopback) authoritative DNS server from the testkit:
//! preference order and shuffling, implicit and null MX, NXDOMAIN, hosts that do not resolve,
//! address filtering, address family order, domain literals, and nameservers that fail or never
//! answer.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mailroom_outbound::mx::{IpVersion, MxError, MxResolver, ResolverConfig, Route, RouteKind};
use mailroom_testkit::{DnsServer, Zone};

fn zone() -> Zone {
    Zone::new()
        // Three preferences, listed out of order.
        .mx("example.test", 30, "mx3.example.test")
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", "127.0.0.1")
        .a("mx2.example.test", "127.0.0.2")
        .a("mx3.example.test", "127.0.0.3")
        // Two hosts of equal preference, then a backup.
        .mx("shuffle.test", 10, "a.shuffle.test")
        .mx("shuffle.test", 10, "b.shuffle.test")
        .mx("shuffle.test", 20, "c.shuffle.test")
        .a("a.shuffle.test", "127.0.1.1")
        .a("b.shuffle.test", "127.0.1.2")
        .a("c.shuffle.test", "127.0.1.3")
        // No MX: the domain's own addresses.
        .a("implicit.test", "127.0.2.1")
        .aaaa("implicit.test", "::1")
        .null_mx("nullmx.test")
        // Exists (has a TXT record) but has neither MX nor addresses.
        .txt("nothing.test", "v=spf1 -all")
        // First host NXDOMAIN, second without addresses, third fine.
        .mx("partial.test", 10, "gone.partial.test")
        .mx("partial.test", 20, "noaddr.partial.test")
        .mx("partial.test", 30, "ok.partial.test")
        .txt("noaddr.partial.test", "no addresses here")
        .a("ok.partial.test", "127.0.3.3")
        // No host resolves, for good.
        .mx("deadmx.test", 10, "gone.deadmx.test")
        .mx("deadmx.test", 20, "noaddr.partial.test")
        // No host resolves, one of them temporarily.
        .mx("flakymx.test", 10, "broken-host.test")
        .mx("flakymx.test", 20, "gone.deadmx.test")
        .a("broken-host.test", "127.0.4.1")
        .servfail("broken-host.test")
        .servfail("servfail.test")
        // Private addresses next to public ones.
        .mx("mixed.test", 10, "private.mixed.test")
        .mx("mixed.test", 20, "public.mixed.test")
        .a("private.mixed.test", "10.0.0.1")
        .aaaa("private.mixed.test", "::ffff:127.0.0.1")
        .a("public.mixed.test", "1.2.3.4")
        .a("public.mixed.test", "127.0.0.1")
        .aaaa("public.mixed.test", "2a01:4f8::25")
        .mx("privonly.test", 10, "mx.privonly.test")
        .a("mx.privonly.test", "127.0.5.1")
        .aaaa("mx.privonly.test", "fd00::25")
        // Both families.
        .mx("dual.test", 10, "mx.dual.test")
        .a("mx.dual.test", "127.0.6.1")
        .aaaa("mx.dual.test", "::1")
        .mx("v6only.test", 10, "mx.v6only.test")
        .aaaa("mx.v6only.test", "::1")
        // An MX host behind a CNAME, an IDN domain, and two hosts sharing an address.
        .mx("cname.test", 10, "alias.cname.test")
        .cname("alias.cname.test", "mx1.example.test")
        .mx("bücher.test", 10, "mx.bücher.test")
        .a("mx.bücher.test", "127.0.7.1")
        .mx("dup.test", 10, "a.dup.test")
        .mx("dup.test", 20, "b.dup.test")
        .a("a.dup.test", "127.0.8.1")
        .a("b.dup.test", "127.0.8.1")
        .a("b.dup.test", "127.0.8.2")
}

fn config(nameserver: SocketAddr) -> ResolverConfig {
    ResolverConfig {
        nameservers: vec![nameserver],
        allow_private: true,
        timeout: Duration::from_secs(2),
        attempts: 1,
        deadline: Duration::from_secs(10),
        ..ResolverConfig::default()
    }
}

fn resolver(dns: &DnsServer) -> MxResolver {
    MxResolver::new(config(dns.addr())).expect("resolver")
}

fn hosts(route: &Route) -> Vec<(u16, &str)> {
    route
        .hosts
        .iter()
        .map(|h| (h.preference, h.name.as_str()))
        .collect()
}

fn addrs(route: &Route) -> Vec<IpAddr> {
    route.addresses().map(|(_, addr)| addr).collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test]
async fn mx_hosts_come_in_preference_order_with_their_addresses() {
    let dns = DnsServer::start(zone()).expect("dns");
    let route = resolver(&dns)
        .resolve("Example.TEST.")
        .await
        .expect("route");
    assert_eq!(route.domain, "example.test");
    assert_eq!(route.kind, RouteKind::Mx);
    assert_eq!(
        hosts(&route),
        [
            (10, "mx1.example.test"),
            (20, "mx2.example.test"),
            (30, "mx3.example.test")
        ]
    );
    assert_eq!(
        addrs(&route),
        [ip("127.0.0.1"), ip("127.0.0.2"), ip("127.0.0.3")]
    );
}

#[tokio::test]
async fn hosts_of_equal_preference_are_shuffled() {
    let dns = DnsServer::start(zone()).expect("dns");
    let mx = resolver(&dns);
    let mut orders = HashSet::new();
    for _ in 0..50 {
        let route = mx.resolve("shuffle.test").await.expect("route");
        let names = hosts(&route);
        assert_eq!(names.len(), 3);
        assert_eq!(names[2], (20, "c.shuffle.test"), "backup stays last");
        orders.insert((names[0].1.to_owned(), names[1].1.to_owned()));
    }
    assert_eq!(orders.len(), 2, "both orders of a/b occur: {orders:?}");
}

#[tokio::test]
async fn without_mx_the_domain_itself_is_the_host() {
    let dns = DnsServer::start(zone()).expect("dns");
    let route = resolver(&dns)
        .resolve("implicit.test")
        .await
        .expect("route");
    assert_eq!(route.kind, RouteKind::Implicit);
    assert_eq!(hosts(&route), [(0, "implicit.test")]);
    assert_eq!(addrs(&route), [ip("127.0.2.1"), ip("::1")]);

    let err = resolver(&dns)
        .resolve("nothing.test")
        .await
        .expect_err("no mx, no address");
    assert!(matches!(err, MxError::NoMailHost { .. }), "{err}");
    assert!(err.is_permanent());
}

#[tokio::test]
async fn null_mx_is_a_permanent_error() {
    let dns = DnsServer::start(zone()).expect("dns");
    let err = resolver(&dns)
        .resolve("nullmx.test")
        .await
        .expect_err("null mx");
    assert!(matches!(err, MxError::NullMx { .. }), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(
        err.to_string(),
        "nullmx.test: null MX (RFC 7505): the domain accepts no mail"
    );
}

#[tokio::test]
async fn nxdomain_is_a_permanent_error() {
    let dns = DnsServer::start(zone()).expect("dns");
    let err = resolver(&dns)
        .resolve("missing.test")
        .await
        .expect_err("nxdomain");
    assert!(matches!(err, MxError::NoSuchDomain { .. }), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.to_string(), "missing.test: no such domain (NXDOMAIN)");
}

#[tokio::test]
async fn mx_hosts_that_do_not_resolve_are_skipped() {
    let dns = DnsServer::start(zone()).expect("dns");
    let mx = resolver(&dns);
    let route = mx.resolve("partial.test").await.expect("route");
    assert_eq!(hosts(&route), [(30, "ok.partial.test")]);

    let err = mx.resolve("deadmx.test").await.expect_err("no host");
    assert!(matches!(err, MxError::NoMxHostResolves { .. }), "{err:?}");
    assert!(err.is_permanent());
    let text = err.to_string();
    assert!(text.contains("gone.deadmx.test: NXDOMAIN"), "{text}");
    assert!(
        text.contains("noaddr.partial.test: no address records"),
        "{text}"
    );

    // One host fails with SERVFAIL: it may resolve later, so the whole failure is transient.
    let err = mx.resolve("flakymx.test").await.expect_err("servfail host");
    assert!(!err.is_permanent(), "{err}");
    assert!(err.to_string().contains("broken-host.test"), "{err}");
}

#[tokio::test]
async fn servfail_on_the_domain_is_transient() {
    let dns = DnsServer::start(zone()).expect("dns");
    let err = resolver(&dns)
        .resolve("servfail.test")
        .await
        .expect_err("servfail");
    assert!(matches!(err, MxError::Temporary { .. }), "{err:?}");
    assert!(!err.is_permanent());
    assert_eq!(err.enhanced_status(), "4.4.3");
}

#[tokio::test]
async fn private_addresses_are_dropped_unless_allowed() {
    let dns = DnsServer::start(zone()).expect("dns");
    let strict = MxResolver::new(ResolverConfig {
        allow_private: false,
        ..config(dns.addr())
    })
    .expect("resolver");

    let route = strict.resolve("mixed.test").await.expect("route");
    assert_eq!(hosts(&route), [(20, "public.mixed.test")]);
    assert_eq!(addrs(&route), [ip("1.2.3.4"), ip("2a01:4f8::25")]);

    let err = strict.resolve("privonly.test").await.expect_err("private");
    assert!(
        matches!(err, MxError::AllAddressesDropped { .. }),
        "{err:?}"
    );
    assert!(err.is_permanent());
    let text = err.to_string();
    assert!(text.contains("127.0.5.1 (loopback)"), "{text}");
    assert!(text.contains("fd00::25 (unique local"), "{text}");
    assert!(text.contains("allow_private"), "{text}");

    let err = strict.resolve("implicit.test").await.expect_err("loopback");
    assert!(
        matches!(err, MxError::AllAddressesDropped { .. }),
        "{err:?}"
    );

    let lenient = resolver(&dns);
    let route = lenient.resolve("mixed.test").await.expect("route");
    assert_eq!(
        addrs(&route),
        [
            ip("10.0.0.1"),
            ip("::ffff:127.0.0.1"),
            ip("1.2.3.4"),
            ip("127.0.0.1"),
            ip("2a01:4f8::25")
        ]
    );
}

#[tokio::test]
async fn address_families_follow_ip_version() {
    let dns = DnsServer::start(zone()).expect("dns");
    let cases = [
        (IpVersion::Ipv4ThenIpv6, vec![ip("127.0.6.1"), ip("::1")]),
        (IpVersion::Ipv6ThenIpv4, vec![ip("::1"), ip("127.0.6.1")]),
        (IpVersion::Ipv4Only, vec![ip("127.0.6.1")]),
        (IpVersion::Ipv6Only, vec![ip("::1")]),
    ];
    for (ip_version, expected) in cases {
        let mx = MxResolver::new(ResolverConfig {
            ip_version,
            ..config(dns.addr())
        })
        .expect("resolver");
        let route = mx.resolve("dual.test").await.expect("route");
        assert_eq!(addrs(&route), expected, "{ip_version:?}");
    }

    let v4_only = MxResolver::new(ResolverConfig {
        ip_version: IpVersion::Ipv4Only,
        ..config(dns.addr())
    })
    .expect("resolver");
    let err = v4_only.resolve("v6only.test").await.expect_err("no A");
    assert!(matches!(err, MxError::NoMxHostResolves { .. }), "{err:?}");
}

#[tokio::test]
async fn cname_idn_and_shared_addresses() {
    let dns = DnsServer::start(zone()).expect("dns");
    let mx = resolver(&dns);

    let route = mx.resolve("cname.test").await.expect("cname route");
    assert_eq!(hosts(&route), [(10, "alias.cname.test")]);
    assert_eq!(addrs(&route), [ip("127.0.0.1")]);

    let route = mx.resolve("Bücher.test.").await.expect("idn route");
    assert_eq!(route.domain, "xn--bcher-kva.test");
    assert_eq!(hosts(&route), [(10, "mx.xn--bcher-kva.test")]);

    // An address is tried once, with the most preferred host that has it.
    let route = mx.resolve("dup.test").await.expect("dup route");
    assert_eq!(route.hosts[0].addresses, [ip("127.0.8.1")]);
    assert_eq!(route.hosts[1].addresses, [ip("127.0.8.2")]);
}

#[tokio::test]
async fn domain_literals_route_to_their_address_without_dns() {
    let dns = DnsServer::start(zone()).expect("dns");
    let lenient = resolver(&dns);
    let strict = MxResolver::new(ResolverConfig {
        allow_private: false,
        ..config(dns.addr())
    })
    .expect("resolver");
    let before = dns.query_count();

    let route = lenient.resolve("[127.0.0.1]").await.expect("v4 literal");
    assert_eq!(route.kind, RouteKind::Literal);
    assert_eq!(route.domain, "[127.0.0.1]");
    assert_eq!(addrs(&route), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);

    let route = strict
        .resolve("[ipv6:2A01:4F8::25]")
        .await
        .expect("v6 literal");
    assert_eq!(route.domain, "[IPv6:2a01:4f8::25]");
    assert_eq!(addrs(&route), [ip("2a01:4f8::25")]);

    let err = strict
        .resolve("[192.0.2.1]")
        .await
        .expect_err("documentation");
    assert!(
        matches!(err, MxError::AllAddressesDropped { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("documentation"), "{err}");

    let err = strict
        .resolve("[not-an-ip]")
        .await
        .expect_err("bad literal");
    assert!(matches!(err, MxError::InvalidDomain { .. }), "{err:?}");
    assert!(err.is_permanent());

    assert_eq!(dns.query_count(), before, "literals need no DNS");
}

#[tokio::test]
async fn a_nameserver_that_never_answers_gives_a_transient_error_in_time() {
    // Bound and never read: queries are accepted by the kernel and never answered.
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let mx = MxResolver::new(ResolverConfig {
        timeout: Duration::from_millis(300),
        attempts: 2,
        deadline: Duration::from_secs(10),
        ..config(silent.local_addr().expect("addr"))
    })
    .expect("resolver");

    let started = Instant::now();
    let err = mx.resolve("example.test").await.expect_err("no answer");
    let elapsed = started.elapsed();
    assert!(matches!(err, MxError::Temporary { .. }), "{err:?}");
    assert!(!err.is_permanent());
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
}

#[tokio::test]
async fn the_deadline_bounds_a_whole_resolution() {
    let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let mx = MxResolver::new(ResolverConfig {
        timeout: Duration::from_secs(5),
        attempts: 3,
        deadline: Duration::from_millis(400),
        ..config(silent.local_addr().expect("addr"))
    })
    .expect("resolver");

    let started = Instant::now();
    let err = mx.resolve("example.test").await.expect_err("deadline");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!err.is_permanent());
    assert!(err.to_string().contains("within 400ms"), "{err}");
}

#[test]
fn resolve_futures_can_be_spawned() {
    fn assert_send<T: Send + 'static>(_: &T) {}
    let mx =
        MxResolver::new(config(SocketAddr::from((Ipv4Addr::LOCALHOST, 53)))).expect("resolver");
    let future = async move { mx.resolve("example.test").await };
    assert_send(&future);
}
