//! Sender authentication plugins (`spf`, `dkimVerify`, `dmarc`, `arcVerify`) through the real
//! inbound server over TCP, with a real authoritative DNS server on loopback (testkit's
//! `DnsServer`) serving the SPF, DKIM, DMARC and ARC records. Messages are signed and sealed
//! with `mail-auth` itself; the client is 127.0.0.1.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{TestServer, spec};
use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::DkimSigner;
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults, SpfOutput, SpfResult};
use mailroom_config::HumanDuration;
use mailroom_queue::{Queue, StoredMessage};
use mailroom_testkit::{DnsServer, Zone};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Our authserv-id (the test listener's host name).
const HOST: &str = "mx.test";

/// The 2048-bit RSA test key (its public half in `dkim-rsa2048.pub.b64`): a TXT record of
/// about 410 bytes, in two character-strings.
const RSA_PEM: &str = include_str!("fixtures/auth/dkim-rsa2048.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/auth/dkim-rsa2048.pub.b64");

/// A new Ed25519 key and its DKIM key record.
fn ed25519() -> (Ed25519Key, String) {
    let pkcs8 = Ed25519Key::generate_pkcs8().expect("generate");
    let key = Ed25519Key::from_pkcs8_der(&pkcs8).expect("key");
    let record = format!(
        "v=DKIM1; k=ed25519; p={}",
        STANDARD.encode(key.public_key())
    );
    (key, record)
}

fn rsa() -> (RsaKey<Sha256>, String) {
    let body: String = RSA_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body).expect("pem base64");
    let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)))
        .expect("rsa key");
    (key, format!("v=DKIM1; k=rsa; p={}", RSA_PUBLIC.trim()))
}

/// A message from `from` (CRLF line endings).
fn message(from: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <rcpt@example.test>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nHello,\r\nthis is {subject}.\r\n"
    )
}

/// `message` with a DKIM signature of `domain` / `selector` by `key` prepended.
fn signed<K>(key: K, domain: &str, selector: &str, message: &str) -> String
where
    K: mail_auth::common::crypto::SigningKey,
{
    let signature = DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(["From", "To", "Subject", "Message-ID"])
        .sign(message.as_bytes())
        .expect("sign");
    format!("{}{message}", signature.to_header())
}

/// Starts a listener named `name` whose plugins are `plugins` (YAML list) and whose resolver
/// asks `nameserver`.
async fn start(name: &str, plugins: &str, nameserver: std::net::SocketAddr) -> TestServer {
    let mut s = spec();
    s.name = name.into();
    s.plugins = common::plugins(plugins);
    s.dns.nameservers = vec![nameserver.to_string()];
    s.dns.timeout = HumanDuration::from_secs(2);
    TestServer::start(s).await
}

/// What the server answered to a delivery, and the stored message when it was queued.
struct Delivery {
    reply: String,
    stored: Option<StoredMessage>,
}

impl Delivery {
    fn stored(&self) -> &[u8] {
        match &self.stored {
            Some(m) => &m.body,
            None => panic!("not queued: {}", self.reply),
        }
    }

    /// Our results, one per entry, from the one `Authentication-Results` field of ours.
    fn results(&self) -> Vec<String> {
        let ours: Vec<String> = fields(self.stored(), "Authentication-Results")
            .into_iter()
            .filter(|v| v.split(';').next().map(str::trim) == Some(HOST))
            .collect();
        assert_eq!(ours.len(), 1, "one field of ours in {}", self.text());
        ours[0]
            .split(';')
            .skip(1)
            .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    fn header(&self, name: &str) -> Vec<String> {
        fields(self.stored(), name)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(self.stored()).into_owned()
    }
}

/// The values of every `name:` field of the header section, unfolded and trimmed.
fn fields(message: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut unfolded: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        match unfolded.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => unfolded.push(line.to_owned()),
        }
    }
    unfolded
        .iter()
        .filter_map(|f| f.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// EHLO `helo`, MAIL FROM `sender`, one recipient, DATA `message`. Stops at a refused MAIL.
/// [`deliver`] of an unsigned [`message`] from `sender`, after `EHLO client.test`.
async fn deliver_plain(server: &TestServer, sender: &str, subject: &str) -> Delivery {
    deliver(server, "client.test", sender, &message(sender, subject)).await
}

async fn deliver(server: &TestServer, helo: &str, sender: &str, message: &str) -> Delivery {
    let mut c = server.session().await;
    c.cmd(&format!("EHLO {helo}"), "250").await;
    c.line(&format!("MAIL FROM:<{sender}>")).await;
    let reply = c.reply().await.expect("MAIL reply");
    if !reply.starts_with("250") {
        return Delivery {
            reply,
            stored: None,
        };
    }
    c.cmd("RCPT TO:<rcpt@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(message.as_bytes()).await;
    c.send(b".\r\n").await;
    let reply = c.reply().await.expect("DATA reply");
    let stored = match reply.strip_prefix("250 2.0.0 Ok: queued as ") {
        Some(id) => server
            .queue
            .get(id.parse().expect("queue id"))
            .await
            .expect("get"),
        None => None,
    };
    Delivery { reply, stored }
}

/// The value of `mailroom_plugin_<kind>_results_total{listener, result}`.
fn counter(kind: &str, listener: &str, result: &str) -> f64 {
    let name = format!("mailroom_plugin_{kind}_results_total");
    prometheus::default_registry()
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|m| {
            let label = |n: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == n)
                    .map(|l| l.value().to_owned())
            };
            label("listener").as_deref() == Some(listener)
                && label("result").as_deref() == Some(result)
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

fn spf_zone() -> Zone {
    Zone::new()
        .txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("soft.test", "v=spf1 ~all")
        .txt("perm.test", "v=spf1 include:nospf.test -all")
        .a("nospf.test", "192.0.2.9")
        .servfail("broken.test")
}

#[tokio::test]
async fn spf_results_are_recorded_and_failures_tagged_by_default() {
    let dns = DnsServer::start(spf_zone()).expect("dns");
    let server = start("spf-default", "  - spf:\n", dns.addr()).await;
    let cases = [
        ("a@pass.test", "spf=pass smtp.mailfrom=pass.test", None),
        (
            "a@fail.test",
            "spf=fail smtp.mailfrom=fail.test",
            Some("fail"),
        ),
        (
            "a@soft.test",
            "spf=softfail smtp.mailfrom=soft.test",
            Some("softfail"),
        ),
        ("a@nospf.test", "spf=none smtp.mailfrom=nospf.test", None),
        ("a@perm.test", "spf=permerror smtp.mailfrom=perm.test", None),
        (
            "a@broken.test",
            "spf=temperror smtp.mailfrom=broken.test",
            None,
        ),
    ];
    for (sender, result, tag) in cases {
        // A forged tag in the input never survives.
        let body = format!("X-Mailroom-SPF: pass\r\n{}", message(sender, "spf"));
        let d = deliver(&server, "client.test", sender, &body).await;
        assert_eq!(d.results(), [result], "{sender}: {}", d.text());
        let expected: Vec<String> = tag.map(str::to_owned).into_iter().collect();
        assert_eq!(d.header("X-Mailroom-SPF"), expected, "{sender}");
    }
    // The null sender is checked by its HELO name (RFC 7208 section 2.3).
    let d = deliver(
        &server,
        "pass.test",
        "",
        &message("mailer-daemon@pass.test", "bounce"),
    )
    .await;
    assert_eq!(d.results(), ["spf=pass smtp.helo=pass.test"]);
    let d = deliver(
        &server,
        "fail.test",
        "",
        &message("mailer-daemon@fail.test", "bounce"),
    )
    .await;
    assert_eq!(d.results(), ["spf=fail smtp.helo=fail.test"]);

    assert!(counter("spf", "spf-default", "pass") >= 2.0);
    assert!(counter("spf", "spf-default", "fail") >= 2.0);
    assert!(counter("spf", "spf-default", "temperror") >= 1.0);
}

#[tokio::test]
async fn spf_fail_is_refused_at_mail_in_reject_mode() {
    let dns = DnsServer::start(spf_zone()).expect("dns");
    let server = start("spf-reject", "  - spf: {fail: reject}\n", dns.addr()).await;
    let d = deliver_plain(&server, "a@fail.test", "x").await;
    assert!(
        d.reply.starts_with("550 5.7.23 ") && d.reply.contains("fail.test"),
        "{}",
        d.reply
    );
    assert!(d.stored.is_none());
    // softfail keeps its default (tag); pass is untouched.
    let d = deliver_plain(&server, "a@soft.test", "x").await;
    assert_eq!(d.header("X-Mailroom-SPF"), ["softfail"]);
    let d = deliver_plain(&server, "a@pass.test", "x").await;
    assert_eq!(d.results(), ["spf=pass smtp.mailfrom=pass.test"]);
    assert_eq!(server.queued().await, 2);
}

#[tokio::test]
async fn spf_temperror_tempfails_when_asked() {
    let dns = DnsServer::start(spf_zone()).expect("dns");
    let plugins = "  - spf: {onTempError: tempfail}\n";
    let server = start("spf-temp", plugins, dns.addr()).await;
    let d = deliver_plain(&server, "a@broken.test", "x").await;
    assert!(d.reply.starts_with("451 4.7.24 "), "{}", d.reply);
    let d = deliver_plain(&server, "a@pass.test", "x").await;
    assert_eq!(d.results(), ["spf=pass smtp.mailfrom=pass.test"]);

    // No DNS server at all: the same.
    let gone = DnsServer::start(Zone::new()).expect("dns");
    let dead = gone.addr();
    drop(gone);
    let server = start("spf-dns-down", plugins, dead).await;
    let d = deliver_plain(&server, "a@pass.test", "x").await;
    assert!(d.reply.starts_with("451 4.7.24 "), "{}", d.reply);
    assert!(counter("spf", "spf-dns-down", "temperror") >= 1.0);
}

/// The first 8 characters of the `b=` tag of the (first) `DKIM-Signature:` of `message`.
fn b_prefix(message: &str) -> String {
    let field = fields(message.as_bytes(), "DKIM-Signature")
        .into_iter()
        .next()
        .expect("signature");
    let b: String = field
        .split(';')
        .map(str::trim)
        .find_map(|tag| tag.strip_prefix("b="))
        .expect("b= tag")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    b[..8].to_owned()
}

#[tokio::test]
async fn dkim_signatures_pass_fail_or_none() {
    let (ed, ed_record) = ed25519();
    let (rsa, rsa_record) = rsa();
    let dns = DnsServer::start(
        Zone::new()
            .txt("ed._domainkey.signer.test", &ed_record)
            .txt("rsa._domainkey.signer.test", &rsa_record),
    )
    .expect("dns");
    let server = start("dkim-default", "  - dkimVerify:\n", dns.addr()).await;

    let plain = message("a@signer.test", "dkim");
    let by_ed = signed(ed, "signer.test", "ed", &plain);
    let d = deliver(&server, "client.test", "a@signer.test", &by_ed).await;
    assert_eq!(
        d.results(),
        [format!(
            "dkim=pass header.d=signer.test header.s=ed header.b={}",
            b_prefix(&by_ed)
        )]
    );

    // RSA 2048: the key record is longer than one TXT character-string.
    let by_both = signed(rsa, "signer.test", "rsa", &by_ed);
    let d = deliver(&server, "client.test", "a@signer.test", &by_both).await;
    assert_eq!(
        d.results(),
        [
            format!(
                "dkim=pass header.d=signer.test header.s=rsa header.b={}",
                b_prefix(&by_both)
            ),
            format!(
                "dkim=pass header.d=signer.test header.s=ed header.b={}",
                b_prefix(&by_ed)
            ),
        ]
    );

    // The body changed after signing.
    let tampered = by_ed.replace("this is dkim.", "this is not what was signed.");
    let d = deliver(&server, "client.test", "a@signer.test", &tampered).await;
    let results = d.results();
    assert_eq!(results.len(), 1);
    assert!(
        results[0]
            .starts_with("dkim=fail (body hash did not verify) header.d=signer.test header.s=ed"),
        "{results:?}"
    );
    assert!(
        d.header("X-Mailroom-DKIM").is_empty(),
        "accept: record only"
    );

    let d = deliver(&server, "client.test", "a@signer.test", &plain).await;
    assert_eq!(d.results(), ["dkim=none"]);

    assert!(counter("dkim_verify", "dkim-default", "pass") >= 2.0);
    assert!(counter("dkim_verify", "dkim-default", "fail") >= 1.0);
    assert!(counter("dkim_verify", "dkim-default", "none") >= 1.0);
}

#[tokio::test]
async fn dkim_failures_are_refused_or_tagged_when_asked() {
    let (ed, ed_record) = ed25519();
    let dns =
        DnsServer::start(Zone::new().txt("ed._domainkey.signer.test", &ed_record)).expect("dns");
    let by_ed = signed(ed, "signer.test", "ed", &message("a@signer.test", "dkim"));
    let tampered = by_ed.replace("this is dkim.", "this is changed.");

    let strict = start(
        "dkim-reject",
        "  - dkimVerify: {onFail: reject}\n",
        dns.addr(),
    )
    .await;
    let d = deliver(&strict, "client.test", "a@signer.test", &tampered).await;
    assert!(d.reply.starts_with("550 5.7.20 "), "{}", d.reply);
    let d = deliver(&strict, "client.test", "a@signer.test", &by_ed).await;
    assert!(d.results()[0].starts_with("dkim=pass "));
    let unsigned = message("a@signer.test", "plain");
    let d = deliver(&strict, "client.test", "a@signer.test", &unsigned).await;
    assert_eq!(d.results(), ["dkim=none"], "unsigned is not a failure");

    let tagging = start("dkim-tag", "  - dkimVerify: {onFail: tag}\n", dns.addr()).await;
    let d = deliver(&tagging, "client.test", "a@signer.test", &tampered).await;
    assert_eq!(d.header("X-Mailroom-DKIM"), ["fail"]);
}

#[tokio::test]
async fn dmarc_applies_the_policy_of_the_from_domain() {
    let (ed, ed_record) = ed25519();
    let dns = DnsServer::start(
        Zone::new()
            .txt("strict.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.strict.test", "v=DMARC1; p=reject")
            .txt("ed._domainkey.strict.test", &ed_record)
            .txt("quar.test", "v=spf1 -all")
            .txt("_dmarc.quar.test", "v=DMARC1; p=quarantine")
            .txt("none.test", "v=spf1 -all")
            .txt("_dmarc.none.test", "v=DMARC1; p=none")
            .txt("sample.test", "v=spf1 -all")
            .txt("_dmarc.sample.test", "v=DMARC1; p=reject; pct=0")
            .txt("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
    )
    .expect("dns");
    let plugins = "  - spf:\n  - dkimVerify:\n  - dmarc:\n";
    let server = start("dmarc", plugins, dns.addr()).await;

    // SPF fails and nothing is signed: p=reject refuses the message.
    let d = deliver_plain(&server, "a@strict.test", "r").await;
    assert!(
        d.reply
            .starts_with("550 5.7.1 Rejected by the DMARC policy of strict.test"),
        "{}",
        d.reply
    );
    // SPF passes for another domain: not aligned, the same.
    let d = deliver(
        &server,
        "client.test",
        "a@pass.test",
        &message("a@strict.test", "r"),
    )
    .await;
    assert!(d.reply.starts_with("550 5.7.1 "), "{}", d.reply);

    // An aligned DKIM signature passes DMARC although SPF fails.
    let by_ed = signed(ed, "strict.test", "ed", &message("a@strict.test", "signed"));
    let d = deliver(&server, "client.test", "a@strict.test", &by_ed).await;
    let results = d.results();
    assert_eq!(results[0], "spf=fail smtp.mailfrom=strict.test");
    assert!(
        results[1].starts_with("dkim=pass header.d=strict.test"),
        "{results:?}"
    );
    assert_eq!(
        results[2],
        "dmarc=pass header.from=strict.test policy.dmarc=reject"
    );
    assert!(d.header("X-Mailroom-DMARC").is_empty());

    let d = deliver_plain(&server, "a@quar.test", "q").await;
    assert_eq!(
        d.results()[2],
        "dmarc=fail header.from=quar.test policy.dmarc=quarantine"
    );
    assert_eq!(d.header("X-Mailroom-DMARC"), ["quarantine"]);

    let d = deliver_plain(&server, "a@none.test", "n").await;
    assert_eq!(
        d.results()[2],
        "dmarc=fail header.from=none.test policy.dmarc=none"
    );
    assert!(
        d.header("X-Mailroom-DMARC").is_empty(),
        "p=none: recorded only"
    );

    // pct=0: no message is in the sample, so p=reject is applied as quarantine.
    let d = deliver_plain(&server, "a@sample.test", "s").await;
    assert_eq!(
        d.results()[2],
        "dmarc=fail header.from=sample.test policy.dmarc=reject"
    );
    assert_eq!(d.header("X-Mailroom-DMARC"), ["quarantine"]);

    assert!(counter("dmarc", "dmarc", "fail") >= 5.0);
    assert!(counter("dmarc", "dmarc", "pass") >= 1.0);
}

#[tokio::test]
async fn dmarc_alone_checks_spf_and_dkim_itself() {
    let dns = DnsServer::start(
        Zone::new()
            .txt("aligned.test", "v=spf1 ip4:127.0.0.1 -all")
            .txt("_dmarc.aligned.test", "v=DMARC1; p=reject")
            .txt("strict.test", "v=spf1 -all")
            .txt("_dmarc.strict.test", "v=DMARC1; p=reject")
            .servfail("_dmarc.broken.test"),
    )
    .expect("dns");
    let plugins = "  - dmarc: {onTempError: tempfail}\n";
    let server = start("dmarc-alone", plugins, dns.addr()).await;

    let d = deliver(
        &server,
        "client.test",
        "a@aligned.test",
        &message("b@aligned.test", "a"),
    )
    .await;
    assert_eq!(
        d.results(),
        ["dmarc=pass header.from=aligned.test policy.dmarc=reject"],
        "only dmarc records a result"
    );
    let d = deliver_plain(&server, "a@strict.test", "s").await;
    assert!(d.reply.starts_with("550 5.7.1 "), "{}", d.reply);
    let d = deliver(
        &server,
        "client.test",
        "a@aligned.test",
        &message("a@broken.test", "t"),
    )
    .await;
    assert!(d.reply.starts_with("451 4.7.1 "), "{}", d.reply);
}

/// `message` ARC-sealed (i=1) by `relay.test` with `key`.
fn sealed(key: Ed25519Key, message: &str) -> String {
    let parsed = AuthenticatedMessage::parse(message.as_bytes()).expect("parse");
    let spf = SpfOutput::new("origin.test".into()).with_result(SpfResult::Pass);
    let results = AuthenticationResults::new("relay.test").with_spf_mailfrom_result(
        &spf,
        "192.0.2.1".parse().expect("ip"),
        "a@origin.test",
        "origin.test",
    );
    let set = ArcSealer::from_key(key)
        .domain("relay.test")
        .selector("arc")
        .headers(["From", "To", "Subject"])
        .seal(&parsed, &results, &ArcOutput::default())
        .expect("seal");
    format!("{}{message}", set.to_header())
}

#[tokio::test]
async fn arc_chains_pass_fail_or_none() {
    let (ed, ed_record) = ed25519();
    let dns =
        DnsServer::start(Zone::new().txt("arc._domainkey.relay.test", &ed_record)).expect("dns");
    let server = start("arc", "  - arcVerify:\n", dns.addr()).await;

    let plain = message("a@origin.test", "arc");
    let sealed = sealed(ed, &plain);
    let d = deliver(&server, "relay.test", "a@origin.test", &sealed).await;
    assert_eq!(d.results(), ["arc=pass (i=1) smtp.remote-ip=127.0.0.1"]);

    let body_changed = sealed.replace("this is arc.", "this is changed.");
    let d = deliver(&server, "relay.test", "a@origin.test", &body_changed).await;
    assert_eq!(
        d.results(),
        ["arc=fail (body hash did not verify) smtp.remote-ip=127.0.0.1"]
    );
    let header_changed = sealed.replace("Subject: arc", "Subject: changed");
    let d = deliver(&server, "relay.test", "a@origin.test", &header_changed).await;
    assert_eq!(
        d.results(),
        ["arc=fail (verification failed) smtp.remote-ip=127.0.0.1"]
    );
    let d = deliver(&server, "relay.test", "a@origin.test", &plain).await;
    assert_eq!(d.results(), ["arc=none smtp.remote-ip=127.0.0.1"]);

    let strict = server_with_reject(&dns).await;
    let d = deliver(&strict, "relay.test", "a@origin.test", &header_changed).await;
    assert!(d.reply.starts_with("550 5.7.29 "), "{}", d.reply);
    let d = deliver(&strict, "relay.test", "a@origin.test", &sealed).await;
    assert!(d.stored.is_some(), "{}", d.reply);
}

async fn server_with_reject(dns: &DnsServer) -> TestServer {
    let plugins = "  - arcVerify: {onFail: reject, recordRemoteIp: false}\n";
    start("arc-reject", plugins, dns.addr()).await
}

#[tokio::test]
async fn one_authentication_results_field_and_forged_ones_are_removed() {
    let (ed, ed_record) = ed25519();
    let dns = DnsServer::start(
        Zone::new()
            .txt("pass.test", "v=spf1 ip4:127.0.0.1 -all")
            .txt("_dmarc.pass.test", "v=DMARC1; p=quarantine")
            .txt("ed._domainkey.pass.test", &ed_record),
    )
    .expect("dns");
    let plugins = "  - spf:\n  - dkimVerify:\n  - dmarc:\n  - arcVerify:\n";
    let server = start("all-auth", plugins, dns.addr()).await;

    let forged = format!(
        "Authentication-Results: MX.test; dkim=pass\r\n header.d=forged.test\r\nAuthentication-Results: other.test; spf=pass smtp.mailfrom=x\r\nX-Mailroom-DMARC: none\r\n{}",
        message("a@pass.test", "all")
    );
    let by_ed = signed(ed, "pass.test", "ed", &forged);
    let d = deliver(&server, "client.test", "a@pass.test", &by_ed).await;
    let results = d.results(); // asserts that exactly one field claims mx.test
    assert_eq!(results.len(), 4, "{results:?}");
    assert_eq!(results[0], "spf=pass smtp.mailfrom=pass.test");
    assert!(results[1].starts_with("dkim=pass header.d=pass.test header.s=ed "));
    assert_eq!(
        results[2],
        "dmarc=pass header.from=pass.test policy.dmarc=quarantine"
    );
    assert_eq!(results[3], "arc=none smtp.remote-ip=127.0.0.1");
    let all = d.header("Authentication-Results");
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.contains(&"other.test; spf=pass smtp.mailfrom=x".to_owned()));
    assert!(!d.text().contains("forged.test"), "{}", d.text());
    assert!(d.header("X-Mailroom-DMARC").is_empty());
    // The field of ours comes right after our Received header.
    let text = d.text();
    let received_end = text
        .find("\r\nAuthentication-Results: mx.test;")
        .expect("ours");
    assert!(text[..received_end].starts_with("Received: "));
}

/// A check that takes longer than `timeout` is a temperror, not a hang.
#[tokio::test]
async fn a_slow_dns_is_bounded_by_the_timeout() {
    // A UDP socket that never answers: every lookup waits for the resolver's timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut s = spec();
    s.name = "spf-slow".into();
    s.plugins = common::plugins("  - spf: {timeout: 300ms, onTempError: tempfail}\n");
    s.dns.nameservers = vec![silent.local_addr().expect("addr").to_string()];
    s.dns.timeout = HumanDuration::from_secs(30);
    let server = TestServer::start(s).await;
    let started = std::time::Instant::now();
    let d = deliver_plain(&server, "a@pass.test", "x").await;
    assert!(d.reply.starts_with("451 4.7.24 "), "{}", d.reply);
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(5)).contains(&started.elapsed()),
        "{:?}",
        started.elapsed()
    );
}
