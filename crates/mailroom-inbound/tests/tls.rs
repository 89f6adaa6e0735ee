//! STARTTLS, implicit TLS, AUTH and certificate reloading, with a real rustls client.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Client, TestServer, spec};
use mailroom_config::{AuthSpec, HumanDuration, ListenerMode, TlsSpec};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Writes a CA-signed certificate for `mx.test` into `dir`; returns the CA certificate.
fn write_pki(dir: &Path) -> CertificateDer<'static> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["mx.test".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    std::fs::write(dir.join("tls.crt.tmp"), leaf.pem()).expect("write cert");
    std::fs::write(dir.join("tls.key.tmp"), leaf_key.serialize_pem()).expect("write key");
    std::fs::rename(dir.join("tls.key.tmp"), dir.join("tls.key")).expect("rename key");
    std::fs::rename(dir.join("tls.crt.tmp"), dir.join("tls.crt")).expect("rename cert");
    ca.der().clone()
}

fn connector(ca: CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("add root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn upgrade(
    c: Client<TcpStream>,
    ca: CertificateDer<'static>,
) -> Client<TlsStream<TcpStream>> {
    let name = ServerName::try_from("mx.test").expect("name");
    let tls = connector(ca)
        .connect(name, c.stream)
        .await
        .expect("TLS handshake");
    Client::new(tls)
}

struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
}

fn tls_spec(implicit: bool, with_auth: bool) -> (mailroom_config::ListenerSpec, Pki) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write_pki(dir.path());
    let mut s = spec();
    let mut tls = TlsSpec::new(
        dir.path().join("tls.crt").display().to_string(),
        dir.path().join("tls.key").display().to_string(),
    );
    tls.implicit = implicit;
    tls.reload_interval = HumanDuration::from_millis(200);
    s.tls = Some(tls);
    if with_auth {
        let hash = bcrypt::hash("s3cret", 4).expect("bcrypt");
        let users = dir.path().join("users");
        std::fs::write(&users, format!("alice:{hash}\n")).expect("users");
        s.auth = Some(AuthSpec::new(users.display().to_string()));
    }
    (s, Pki { dir, ca })
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext() {
    let (s, pki) = tls_spec(false, false);
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("STARTTLS"));
    // The injection of CVE-2011-0411: commands after STARTTLS in the same packet.
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        .await;
    c.expect("220 2.0.0").await;
    let mut t = upgrade(c, pki.ca.clone()).await;
    // Had the injected MAIL survived, its 503 (no EHLO yet) would come first.
    let ehlo = t.cmd("EHLO client.test", "250-mx.test").await;
    assert!(!ehlo.contains("STARTTLS"), "STARTTLS is not offered twice");
    t.cmd("STARTTLS", "503 5.5.1").await;
    t.cmd("MAIL FROM:<real@client.test>", "250 2.1.0").await;
    t.cmd("RCPT TO:<r@example.test>", "250").await;
    t.cmd("DATA", "354").await;
    t.send(b"Subject: tls\r\n\r\nsecret\r\n.\r\n").await;
    let m = server.stored_after(&mut t).await;
    assert!(String::from_utf8_lossy(&m.body).contains("with ESMTPS id"));
    drop(pki.dir);
}

#[tokio::test]
async fn auth_is_offered_and_accepted_only_over_tls() {
    let (s, pki) = tls_spec(false, true);
    let server = TestServer::start(s).await;
    let mut c = server.session().await;
    let ehlo = c.cmd("EHLO client.test", "250").await;
    assert!(!ehlo.contains("AUTH"), "no AUTH before TLS: {ehlo}");
    c.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==", "538 5.7.11").await;
    c.cmd("STARTTLS", "220").await;
    let mut t = upgrade(c, pki.ca.clone()).await;
    let ehlo = t.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    // Not yet authenticated: no relaying.
    t.cmd("MAIL FROM:<alice@client.test>", "250").await;
    t.cmd("RCPT TO:<friend@faraway.test>", "550 5.7.1").await;
    t.cmd("RSET", "250").await;
    // base64("\0alice\0wrong")
    t.cmd("AUTH PLAIN AGFsaWNlAHdyb25n", "535 5.7.8").await;
    t.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    t.cmd("YWxpY2U=", "334 UGFzc3dvcmQ6").await;
    t.cmd("czNjcmV0", "235 2.7.0").await;
    t.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==", "503 5.5.1").await;
    t.cmd("MAIL FROM:<alice@client.test>", "250").await;
    t.cmd("RCPT TO:<friend@faraway.test>", "250 2.1.5").await;
    drop(pki.dir);
}

#[tokio::test]
async fn submission_requires_auth_and_gets_message_id_and_date() {
    let (mut s, pki) = tls_spec(true, true);
    s.mode = ListenerMode::Submission;
    s.plugins = common::plugins("  - headers: {}\n");
    let server = TestServer::start(s).await;
    let c = server.connect().await;
    let mut t = upgrade(c, pki.ca.clone()).await;
    t.expect("220 mx.test").await;
    let ehlo = t.cmd("EHLO client.test", "250").await;
    assert!(
        !ehlo.contains("STARTTLS"),
        "implicit TLS offers no STARTTLS"
    );
    t.cmd("MAIL FROM:<alice@client.test>", "530 5.7.0").await;
    // AUTH PLAIN with the initial response on a 334 round trip.
    t.cmd("AUTH PLAIN", "334").await;
    t.cmd("AGFsaWNlAHMzY3JldA==", "235 2.7.0").await;
    t.cmd("MAIL FROM:<alice@client.test>", "250").await;
    t.cmd("RCPT TO:<friend@faraway.test>", "250").await;
    t.cmd("DATA", "354").await;
    t.send(b"Subject: no ids\r\n\r\nbody\r\n.\r\n").await;
    let m = server.stored_after(&mut t).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("\r\nDate: "), "{text}");
    assert!(text.contains("\r\nMessage-ID: <"), "{text}");
    assert!(text.contains("with ESMTPSA id"), "{text}");
    assert_eq!(m.envelope.auth_user.as_deref(), Some("alice"));
    assert!(m.envelope.message_id.is_some());
    drop(pki.dir);
}

#[tokio::test]
async fn certificates_are_reloaded_when_the_files_change() {
    let (s, pki) = tls_spec(true, false);
    let server = TestServer::start(s).await;
    let c = server.connect().await;
    let mut t = upgrade(c, pki.ca.clone()).await;
    t.expect("220").await;
    // New files from a new CA: the old CA no longer verifies once the server reloads.
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct mtime
    let new_ca = write_pki(pki.dir.path());
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stream = TcpStream::connect(server.addr).await.expect("connect");
        let name = ServerName::try_from("mx.test").expect("name");
        if let Ok(tls) = connector(new_ca.clone()).connect(name, stream).await {
            let mut t = Client::new(tls);
            t.expect("220").await;
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the new certificate was not served within 5s");
}
