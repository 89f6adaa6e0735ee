//! DKIM signing, checked the way a receiver checks it: every signature is verified by mail-auth's
//! verifier, which fetches the public key from the testkit's authoritative DNS server on loopback.
//!
//! Ed25519 keys are generated here; RSA keys (ring cannot generate them) and an Ed25519 key as
//! OpenSSL writes it are test-only fixtures in `tests/fixtures/` (see its README). Covered: both
//! algorithms and both RSA key formats, key choice by `From:` domain (parent domains, the most
//! specific wins, case, other domains), what breaks a signature (body, signed header, a second
//! `From:`) and what does not (relaxed whitespace), messages that are not signed (no or two
//! `From:`, malformed and random bytes, never a panic), and configuration errors naming the field.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner as MailAuthSigner, Signature};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use mailroom_config::{DkimAlgorithm, DkimSpec};
use mailroom_outbound::dkim::{DkimError, DkimSigner};
use mailroom_testkit::{DnsServer, Zone};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject as _;
use tempfile::TempDir;

const POLICY: &str = "outbound";
/// Upper bound of one verification (DNS on loopback answers in milliseconds).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn spec(domain: &str, selector: &str, key_file: &str) -> DkimSpec {
    DkimSpec {
        domain: domain.to_owned(),
        selector: selector.to_owned(),
        key_file: key_file.to_owned(),
        algorithm: None,
        headers: Vec::new(),
    }
}

/// A key file and the TXT record that publishes its public key.
struct TestKey {
    path: String,
    record: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// A new Ed25519 key (PKCS#8 v2, as ring writes it) in `dir`.
fn ed25519_key(dir: &TempDir, name: &str) -> TestKey {
    let der = Ed25519Key::generate_pkcs8().expect("generate Ed25519 key");
    let public = Ed25519Key::from_pkcs8_der(&der)
        .expect("load Ed25519 key")
        .public_key();
    let path = dir.path().join(name);
    std::fs::write(&path, pem("PRIVATE KEY", &der)).expect("write key");
    TestKey {
        path: path.to_str().expect("UTF-8 temp path").to_owned(),
        record: format!("v=DKIM1; k=ed25519; p={}", BASE64.encode(public)),
    }
}

/// The OpenSSL-made Ed25519 fixture (PKCS#8 v1: no public key inside).
fn ed25519_openssl_key() -> TestKey {
    let path = fixture("dkim-ed25519-openssl.pem");
    let der = PrivatePkcs8KeyDer::from_pem_file(&path).expect("fixture PEM");
    let public = Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der())
        .expect("fixture key")
        .public_key();
    TestKey {
        path,
        record: format!("v=DKIM1; k=ed25519; p={}", BASE64.encode(public)),
    }
}

/// The 2048-bit RSA fixture record: `p=` is its SubjectPublicKeyInfo, as `openssl pkey -pubout`
/// prints it (what operators publish).
fn rsa_record() -> String {
    let text = std::fs::read_to_string(fixture("dkim-rsa2048.pub.pem")).expect("public key");
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    format!("v=DKIM1; k=rsa; p={b64}")
}

fn message(from: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Alice <{from}>\r\nTo: bob@example.net\r\nSubject: Hello\r\n\
         Date: Sat, 28 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}"
    )
    .into_bytes()
}

fn join(fields: &[u8], message: &[u8]) -> Vec<u8> {
    [fields, message].concat()
}

fn signer(specs: &[DkimSpec]) -> DkimSigner {
    DkimSigner::new(POLICY, specs).expect("signer")
}

/// Signs and prepends; panics when the signer returns `None`.
fn sign(signer: &DkimSigner, message: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let fields = signer.sign(message).expect("sign").expect("a key applies");
    (fields.clone(), join(&fields, message))
}

fn authenticator(nameserver: SocketAddr) -> MessageAuthenticator {
    let mut udp = ConnectionConfig::udp();
    udp.port = nameserver.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = nameserver.port();
    let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
        nameserver.ip(),
        true,
        vec![udp, tcp],
    )]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    MessageAuthenticator::new(config, opts).expect("authenticator")
}

/// The result of every DKIM-Signature of `message`, in header order.
async fn verify(auth: &MessageAuthenticator, message: &[u8]) -> Vec<DkimResult> {
    let parsed = AuthenticatedMessage::parse(message).expect("parse signed message");
    let outputs = tokio::time::timeout(VERIFY_TIMEOUT, auth.verify_dkim(&parsed))
        .await
        .expect("verification finished in time");
    outputs.iter().map(|o| o.result().clone()).collect()
}

/// The parsed signatures of `message`, in header order.
fn signatures(message: &[u8]) -> Vec<Signature> {
    let parsed = AuthenticatedMessage::parse(message).expect("parse signed message");
    assert!(parsed.errors.is_empty(), "signature parse errors");
    parsed
        .dkim_headers
        .iter()
        .map(|h| h.header.clone())
        .collect()
}

/// Checks the header field's form: `DKIM-Signature: `, CRLF line ends, folded lines.
fn assert_field_form(fields: &[u8]) {
    let text = std::str::from_utf8(fields).expect("ASCII field");
    assert!(text.starts_with("DKIM-Signature: "), "{text}");
    assert!(text.ends_with("\r\n"), "{text}");
    let lines: Vec<&str> = text.trim_end_matches("\r\n").split("\r\n").collect();
    assert!(lines.len() > 1, "folded: {text}");
    for line in &lines {
        assert!(
            !line.contains('\n') && !line.contains('\r'),
            "bare CR/LF in {line:?}"
        );
        // mail-auth folds near 76 columns; RFC 5322 §2.1.1 sets 998 as the hard limit.
        assert!(line.len() <= 80, "line of {} octets: {line:?}", line.len());
    }
    for line in &lines[1..] {
        assert!(line.starts_with([' ', '\t']), "continuation line {line:?}");
    }
}

/// One signature, and it failed cryptographically (a signed header changed).
fn assert_fails(results: &[DkimResult]) {
    assert!(
        matches!(results, [DkimResult::Fail(_)]),
        "expected one failed signature: {results:?}"
    );
}

fn count_from(h: &[String]) -> usize {
    h.iter().filter(|n| n.eq_ignore_ascii_case("from")).count()
}

#[tokio::test]
async fn ed25519_signature_verifies() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");
    let dns =
        DnsServer::start(Zone::new().txt("ed._domainkey.example.com", &key.record)).expect("dns");
    let signer = signer(&[spec("example.com", "ed", &key.path)]);
    assert!(signer.signs());

    let (fields, signed) = sign(&signer, &message("alice@example.com", "Hi Bob.\r\n"));
    assert_field_form(&fields);
    let sigs = signatures(&signed);
    assert_eq!(sigs.len(), 1);
    let sig = &sigs[0];
    assert_eq!(sig.d, "example.com");
    assert_eq!(sig.s, "ed");
    assert_eq!(sig.a, mail_auth::common::crypto::Algorithm::Ed25519Sha256);
    assert_eq!(
        (sig.ch, sig.cb),
        (Canonicalization::Relaxed, Canonicalization::Relaxed)
    );
    assert!(sig.t > 0, "t= is set");
    assert_eq!(sig.l, 0, "no l=");
    assert_eq!(sig.x, 0, "no x=");
    assert_eq!(count_from(&sig.h), 2, "From oversigned: {:?}", sig.h);
    for name in ["to", "subject", "date", "message-id", "mime-version"] {
        assert!(
            sig.h.iter().any(|h| h.eq_ignore_ascii_case(name)),
            "{name} signed: {:?}",
            sig.h
        );
    }

    let auth = authenticator(dns.addr());
    assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);

    // The key as OpenSSL writes it (PKCS#8 v1) signs too.
    let openssl = ed25519_openssl_key();
    dns.set_zone(Zone::new().txt("ossl._domainkey.example.com", &openssl.record))
        .expect("zone");
    let signer = self::signer(&[spec("example.com", "ossl", &openssl.path)]);
    let (_, signed) = sign(&signer, &message("alice@example.com", "Hi.\r\n"));
    assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);
}

#[tokio::test]
async fn rsa_signatures_verify_with_pkcs1_and_pkcs8_keys() {
    let record = rsa_record();
    let dns = DnsServer::start(
        Zone::new()
            .txt("pkcs8._domainkey.example.com", &record)
            .txt("pkcs1._domainkey.example.com", &record),
    )
    .expect("dns");
    let auth = authenticator(dns.addr());
    for (selector, file) in [
        ("pkcs8", "dkim-rsa2048.pem"),
        ("pkcs1", "dkim-rsa2048-pkcs1.pem"),
    ] {
        let mut entry = spec("example.com", selector, &fixture(file));
        entry.algorithm = Some(DkimAlgorithm::RsaSha256);
        let signer = signer(&[entry]);
        let (fields, signed) = sign(&signer, &message("alice@example.com", "Hi Bob.\r\n"));
        assert_field_form(&fields);
        let sigs = signatures(&signed);
        assert_eq!(sigs[0].a, mail_auth::common::crypto::Algorithm::RsaSha256);
        assert_eq!(sigs[0].s, selector);
        assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass], "{file}");
    }
}

#[tokio::test]
async fn two_keys_of_one_domain_both_sign() {
    let dir = TempDir::new().expect("tempdir");
    let ed = ed25519_key(&dir, "ed.pem");
    let dns = DnsServer::start(
        Zone::new()
            .txt("rsa._domainkey.example.com", &rsa_record())
            .txt("ed._domainkey.example.com", &ed.record),
    )
    .expect("dns");
    let signer = signer(&[
        spec("example.com", "rsa", &fixture("dkim-rsa2048.pem")),
        spec("example.com", "ed", &ed.path),
    ]);
    let (fields, signed) = sign(&signer, &message("alice@example.com", "Hi.\r\n"));
    let text = String::from_utf8_lossy(&fields);
    assert_eq!(text.matches("DKIM-Signature: ").count(), 2, "{text}");
    let selectors: Vec<String> = signatures(&signed).into_iter().map(|s| s.s).collect();
    assert_eq!(selectors, ["rsa", "ed"]);
    let auth = authenticator(dns.addr());
    assert_eq!(
        verify(&auth, &signed).await,
        [DkimResult::Pass, DkimResult::Pass]
    );
}

#[tokio::test]
async fn from_domain_picks_the_most_specific_key() {
    let dir = TempDir::new().expect("tempdir");
    let parent = ed25519_key(&dir, "parent.pem");
    let child = ed25519_key(&dir, "child.pem");
    let dns = DnsServer::start(
        Zone::new()
            .txt("parent._domainkey.example.com", &parent.record)
            .txt("child._domainkey.news.example.com", &child.record),
    )
    .expect("dns");
    let auth = authenticator(dns.addr());

    // The parent key alone signs its subdomains.
    let parent_only = signer(&[spec("example.com", "parent", &parent.path)]);
    let (_, signed) = sign(&parent_only, &message("a@news.example.com", "Hi.\r\n"));
    assert_eq!(signatures(&signed)[0].d, "example.com");
    assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);

    // With both, the more specific one wins, whatever the order and the case.
    let both = signer(&[
        spec("example.com", "parent", &parent.path),
        spec("news.example.com", "child", &child.path),
    ]);
    for (from, domain) in [
        ("a@news.example.com", "news.example.com"),
        ("A@NEWS.Example.COM", "news.example.com"),
        ("a@deep.news.example.com", "news.example.com"),
        ("a@example.com", "example.com"),
        ("a@shop.example.com", "example.com"),
    ] {
        let (fields, signed) = sign(&both, &message(from, "Hi.\r\n"));
        assert_eq!(
            String::from_utf8_lossy(&fields)
                .matches("DKIM-Signature")
                .count(),
            1,
            "{from}"
        );
        assert_eq!(signatures(&signed)[0].d, domain, "{from}");
        assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass], "{from}");
    }

    // Other domains, including look-alikes that only end with a key domain, are not signed.
    for from in [
        "a@example.org",
        "a@notexample.com",
        "a@example.com.evil.test",
        "a@com",
    ] {
        assert_eq!(
            both.sign(&message(from, "Hi.\r\n")).expect("sign"),
            None,
            "{from}"
        );
    }
}

#[tokio::test]
async fn changes_after_signing_fail_verification() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");
    let dns =
        DnsServer::start(Zone::new().txt("ed._domainkey.example.com", &key.record)).expect("dns");
    let auth = authenticator(dns.addr());
    let signer = signer(&[spec("example.com", "ed", &key.path)]);
    let original = message("alice@example.com", "Pay 10 EUR.\r\n");
    let (fields, signed) = sign(&signer, &original);
    assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);

    let changed_body = join(&fields, &message("alice@example.com", "Pay 1000 EUR.\r\n"));
    assert_eq!(
        verify(&auth, &changed_body).await,
        [DkimResult::Neutral(mail_auth::Error::Dkim(
            mail_auth::dkim::DkimError::FailedBodyHashMatch
        ))]
    );

    let text = String::from_utf8(signed.clone()).expect("ASCII");
    let changed_subject = text.replace("Subject: Hello", "Subject: Urgent");
    assert_fails(&verify(&auth, changed_subject.as_bytes()).await);

    // A second From added above the signed one: verifiers take instances bottom-up (RFC 6376
    // §5.4.2), so only the second `from` in h= covers it.
    let mallory = b"From: mallory@evil.test\r\n".as_slice();
    let added_top = join(&fields, &[mallory, &original].concat());
    assert_fails(&verify(&auth, &added_top).await);
    // Control: signed with From listed once, the same addition goes unnoticed.
    let der = PrivatePkcs8KeyDer::from_pem_file(&key.path).expect("key PEM");
    let once =
        MailAuthSigner::from_key(Ed25519Key::from_pkcs8_der(der.secret_pkcs8_der()).expect("key"))
            .domain("example.com")
            .selector("ed")
            .headers(["From", "Subject"])
            .sign(&original)
            .expect("sign without oversigning");
    let unprotected = join(once.to_header().as_bytes(), &[mallory, &original].concat());
    assert_eq!(verify(&auth, &unprotected).await, [DkimResult::Pass]);
    // Added below the signed one, at the end of the header section.
    let header_end = text.find("\r\n\r\n").expect("header end") + 2;
    let added_bottom = format!(
        "{}From: mallory@evil.test\r\n{}",
        &text[..header_end],
        &text[header_end..]
    );
    assert_fails(&verify(&auth, added_bottom.as_bytes()).await);

    // A header listed but absent (Cc) is signed as absent (RFC 6376 §5.4).
    let added_cc = text.replace(
        "To: bob@example.net\r\n",
        "To: bob@example.net\r\nCc: x@y.test\r\n",
    );
    assert_fails(&verify(&auth, added_cc.as_bytes()).await);

    // Relaxed canonicalization: whitespace changes and header case do not matter.
    let rewrapped = text
        .replace("Subject: Hello", "subject:   Hello  ")
        .replace("Pay 10 EUR.", "Pay  10   EUR.  ");
    assert_eq!(
        verify(&auth, rewrapped.as_bytes()).await,
        [DkimResult::Pass]
    );
}

#[tokio::test]
async fn configured_headers_are_signed_and_from_is_always_added() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");
    let dns =
        DnsServer::start(Zone::new().txt("ed._domainkey.example.com", &key.record)).expect("dns");
    let mut entry = spec("example.com", "ed", &key.path);
    entry.headers = vec!["Subject".to_owned(), "X-Campaign".to_owned()];
    let signer = signer(&[entry]);
    let (_, signed) = sign(&signer, &message("alice@example.com", "Hi.\r\n"));
    let h = &signatures(&signed)[0].h;
    assert_eq!(count_from(h), 2, "{h:?}");
    assert!(h.iter().any(|n| n.eq_ignore_ascii_case("subject")), "{h:?}");
    assert!(!h.iter().any(|n| n.eq_ignore_ascii_case("to")), "{h:?}");
    let auth = authenticator(dns.addr());
    assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);
    // To is not signed: changing it keeps the signature valid.
    let text = String::from_utf8(signed).expect("ASCII");
    let changed_to = text.replace("To: bob@example.net", "To: carol@example.net");
    assert_eq!(
        verify(&auth, changed_to.as_bytes()).await,
        [DkimResult::Pass]
    );
}

#[tokio::test]
async fn non_utf8_messages_are_signed() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");
    let dns =
        DnsServer::start(Zone::new().txt("ed._domainkey.example.com", &key.record)).expect("dns");
    let signer = signer(&[spec("example.com", "ed", &key.path)]);
    let message = b"From: Ren\xe9 <rene@example.com>\r\nSubject: Caf\xe9\r\n\r\n\xff\xfe body\r\n";
    let (_, signed) = sign(&signer, message);
    let auth = authenticator(dns.addr());
    assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);
}

#[test]
fn messages_without_a_usable_from_are_not_signed() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");
    let signer = signer(&[spec("example.com", "ed", &key.path)]);
    let cases: [&[u8]; 12] = [
        b"",
        b"\r\n\r\n",
        b"To: bob@example.com\r\nSubject: no From\r\n\r\nbody\r\n",
        b"From: undisclosed-recipients:;\r\n\r\nbody\r\n",
        b"From: alice\r\n\r\n",
        b"From: alice@\r\n\r\n",
        b"From: alice@[192.0.2.1]\r\n\r\n",
        b"From: a@example.com\r\nFrom: b@example.com\r\n\r\ntwo authors fields\r\n",
        b"From: a@example.com", // no line end: not a complete header field
        b"\xff\xfe\xfd: \xff\r\n\r\n",
        b"From a@example.com Sat Nov 28 12:00:00 2026\r\n\r\n",
        b"\r\nFrom: a@example.com\r\n\r\n",
    ];
    for (i, case) in cases.iter().enumerate() {
        let result = signer.sign(case).expect("sign");
        assert_eq!(
            result,
            None,
            "case {i}: {:?}",
            String::from_utf8_lossy(case)
        );
    }
    // A header section without the empty line and body is still a message with one From.
    assert!(
        signer
            .sign(b"From: a@example.com\r\nSubject: s\r\n")
            .expect("sign")
            .is_some()
    );
}

#[test]
fn random_bytes_never_panic() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");
    let signer = signer(&[spec("example.com", "ed", &key.path)]);
    // Fragments that steer the parsers into their edge cases, glued at random.
    let fragments: [&[u8]; 14] = [
        b"From: a@example.com",
        b"From:",
        b"\r\n",
        b"\n",
        b"\r",
        b"\r\n\r\n",
        b" ",
        b"\t",
        b":",
        b"<",
        b">",
        b"\"",
        b"=?utf-8?b?w6k=?=",
        b"\xff\x00\x80",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64: deterministic, so a failure reproduces.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        let mut message = Vec::new();
        for _ in 0..(next() % 24) {
            if next() % 3 == 0 {
                message.extend((0..next() % 8).map(|_| (next() & 0xff) as u8));
            } else {
                message.extend_from_slice(fragments[(next() % 14) as usize]);
            }
        }
        // Signing may or may not apply; it must return.
        let _ = signer.sign(&message).expect("sign");
    }
}

#[test]
fn no_entries_sign_nothing() {
    // Workers share one signer across tasks.
    fn shareable<T: Send + Sync>() {}
    shareable::<DkimSigner>();
    let signer = signer(&[]);
    assert!(!signer.signs());
    assert_eq!(
        signer
            .sign(&message("alice@example.com", "Hi.\r\n"))
            .expect("sign"),
        None
    );
}

fn error(specs: &[DkimSpec]) -> DkimError {
    DkimSigner::new(POLICY, specs).expect_err("configuration error")
}

fn assert_field(err: &DkimError, field: &str, words: &str) {
    assert_eq!(err.field(), Some(field), "{err}");
    let text = err.to_string();
    assert!(text.starts_with(field), "{text}");
    assert!(text.contains(words), "{text:?} should say {words:?}");
}

#[test]
fn bad_key_files_name_the_field() {
    let dir = TempDir::new().expect("tempdir");
    let good = ed25519_key(&dir, "good.pem");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("path");
    let err = error(&[
        spec("example.com", "a", &good.path),
        spec("example.com", "b", missing),
    ]);
    assert!(matches!(err, DkimError::ReadKey { .. }), "{err:?}");
    assert_field(&err, "policies[outbound].dkim[1].keyFile", "missing.pem");

    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("path").to_owned()
    };
    // A cut PKCS#8 structure, and a well-formed key of another type (ECDSA P-256 from rcgen).
    let der = Ed25519Key::generate_pkcs8().expect("generate");
    let truncated = pem("PRIVATE KEY", &der[..der.len() / 2]);
    let ecdsa = rcgen::KeyPair::generate()
        .expect("ECDSA key")
        .serialize_pem();
    for (name, text, words) in [
        ("garbage.pem", "not a key\n", "no private key found"),
        (
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "no private key found",
        ),
        (
            "encrypted.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "encrypted",
        ),
        (
            "bad-base64.pem",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----\n",
            "not a PEM private key",
        ),
        ("truncated.pem", &truncated, "malformed PKCS#8 key"),
        ("ecdsa.pem", &ecdsa, "neither an RSA nor an Ed25519 key"),
        (
            "short-rsa.pem",
            "-----BEGIN RSA PRIVATE KEY-----\nMAA=\n-----END RSA PRIVATE KEY-----\n",
            "malformed",
        ),
    ] {
        let path = write(name, text);
        let err = error(&[spec("example.com", "s", &path)]);
        assert!(matches!(err, DkimError::BadKey { .. }), "{name}: {err:?}");
        assert_field(&err, "policies[outbound].dkim[0].keyFile", words);
    }

    // A directory, and a huge file, are not keys.
    let err = error(&[spec("example.com", "s", dir.path().to_str().expect("path"))]);
    assert_eq!(
        err.field(),
        Some("policies[outbound].dkim[0].keyFile"),
        "{err}"
    );
    let huge = write("huge.pem", &"A".repeat(100_000));
    let err = error(&[spec("example.com", "s", &huge)]);
    assert_field(&err, "policies[outbound].dkim[0].keyFile", "not a key file");
}

#[test]
fn algorithm_must_match_the_key() {
    let dir = TempDir::new().expect("tempdir");
    let ed = ed25519_key(&dir, "ed.pem");
    let mut entry = spec("example.com", "ed", &ed.path);
    entry.algorithm = Some(DkimAlgorithm::RsaSha256);
    let err = error(&[spec("example.com", "ok", &ed.path), entry]);
    assert!(
        matches!(err, DkimError::AlgorithmMismatch { .. }),
        "{err:?}"
    );
    assert_field(
        &err,
        "policies[outbound].dkim[1].algorithm",
        "rsa-sha256 does not match the ed25519-sha256 key",
    );

    let mut entry = spec("example.com", "rsa", &fixture("dkim-rsa2048-pkcs1.pem"));
    entry.algorithm = Some(DkimAlgorithm::Ed25519Sha256);
    let err = error(&[entry]);
    assert_field(
        &err,
        "policies[outbound].dkim[0].algorithm",
        "ed25519-sha256 does not match the rsa-sha256 key",
    );

    let mut entry = spec("example.com", "ed", &ed.path);
    entry.algorithm = Some(DkimAlgorithm::Ed25519Sha256);
    assert!(signer(&[entry]).signs());
}

#[test]
fn rsa_keys_of_unusable_sizes_are_refused() {
    let err = error(&[spec("example.com", "s", &fixture("dkim-rsa768.pem"))]);
    assert!(
        matches!(err, DkimError::RsaKeyTooShort { bits: 768, .. }),
        "{err:?}"
    );
    assert_field(
        &err,
        "policies[outbound].dkim[0].keyFile",
        "768 bits; DKIM needs at least 1024",
    );

    let err = error(&[spec("example.com", "s", &fixture("dkim-rsa1024.pem"))]);
    assert!(
        matches!(err, DkimError::RsaKeySizeUnsupported { bits: 1024, .. }),
        "{err:?}"
    );
    assert_field(
        &err,
        "policies[outbound].dkim[0].keyFile",
        "2048 to 4096-bit RSA keys only",
    );
}

#[test]
fn bad_settings_name_the_field() {
    let dir = TempDir::new().expect("tempdir");
    let key = ed25519_key(&dir, "ed.pem");

    let err = error(&[spec("bad domain", "s", &key.path)]);
    assert_field(&err, "policies[outbound].dkim[0].domain", "invalid domain");
    let err = error(&[spec("bücher.example", "s", &key.path)]);
    assert_field(&err, "policies[outbound].dkim[0].domain", "A-labels");

    for selector in ["", "a;b", "s1; x=1", "a..b", "a\r\nb"] {
        let err = error(&[spec("example.com", selector, &key.path)]);
        assert_field(&err, "policies[outbound].dkim[0].selector", "letters");
    }

    let mut entry = spec("example.com", "s", &key.path);
    entry.headers = vec!["Subject".to_owned(), "Bad Name".to_owned()];
    let err = error(&[entry]);
    assert_field(
        &err,
        "policies[outbound].dkim[0].headers[1]",
        "not a header field name",
    );

    let err = error(&[
        spec("example.com", "s", &key.path),
        spec("Example.COM", "S", &key.path),
    ]);
    assert_field(
        &err,
        "policies[outbound].dkim[1].selector",
        "used by dkim[0]",
    );
    // The same selector under another domain is another record.
    assert!(
        signer(&[
            spec("example.com", "s", &key.path),
            spec("example.org", "s", &key.path),
        ])
        .signs()
    );
}
