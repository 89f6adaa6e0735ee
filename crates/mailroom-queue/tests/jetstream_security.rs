//! Security-related JetStream behaviour against real nats-servers (`mailroom-testkit`; build the
//! binary with `e2e/tools/build.sh`): decentralized (operator/JWT) auth with a `.creds` file,
//! mutual TLS, and the rollback of an enqueue that the server's permissions refuse half-way.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{eventually, nats, object_gone, refs_key_present};
use mailroom_queue::contract;
use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue, NatsAuth, NatsTls};
use mailroom_queue::{Queue, QueueError};
use mailroom_testkit::NatsServer;
use nkeys::KeyPair;
use serde_json::{Value, json};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused client is watched for (it must not become ready meanwhile).
const REFUSED_FOR: Duration = Duration::from_secs(3);

fn options(server: &NatsServer) -> JetStreamOptions {
    JetStreamOptions {
        urls: vec![server.url()],
        publish_timeout: PUBLISH_TIMEOUT,
        ..JetStreamOptions::default()
    }
}

/// A nats config string literal (JSON string syntax is valid nats config syntax).
fn quoted(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

fn quoted_path(p: &Path) -> String {
    quoted(&p.to_string_lossy())
}

/// Connects with options the server refuses: that is no start-up error, but the queue is not
/// ready, does not become ready within [`REFUSED_FOR`], and enqueue fails with `Unavailable`.
async fn assert_refused(options: JetStreamOptions, what: &str) {
    let started = Instant::now();
    let queue = JetStreamQueue::connect(options)
        .await
        .unwrap_or_else(|e| panic!("{what}: a refused client is not a start-up error: {e}"));
    assert!(
        started.elapsed() < PUBLISH_TIMEOUT + Duration::from_secs(2),
        "{what}: connect gives up after publish_timeout: {:?}",
        started.elapsed()
    );
    assert!(
        !eventually(REFUSED_FOR, || queue.is_ready()).await,
        "{what}: never ready"
    );
    let result = queue
        .enqueue(contract::message("a@example.org", &["x@one.example"]))
        .await;
    eprintln!("{what}: {result:?}");
    assert!(
        matches!(result, Err(QueueError::Unavailable(_))),
        "{what}: enqueue is refused as unavailable: {result:?}"
    );
}

/// Asserts that the server log says why it refused (the strings are those of the nats-server
/// version `e2e/tools/build.sh` pins).
fn assert_logged(server: &NatsServer, reasons: &[&str]) {
    let log = server.log();
    for reason in reasons {
        assert!(
            log.contains(reason),
            "nats-server log lacks {reason:?}:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Operator / JWT mode
// ---------------------------------------------------------------------------------------------

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A NATS JWT (v2) about `subject`, signed by `issuer`: header `{"typ":"JWT","alg":
/// "ed25519-nkey"}`, the standard claims plus `nats`, base64url without padding, and an ed25519
/// signature of `header.payload`.
///
/// `jti` only has to be unique: nats-server (jwt/v2 `Decode`) checks the header, the signature,
/// the issuer's key type and `exp`/`nbf`, never the `jti` (which `nsc` makes the base32 of a
/// SHA-512/256 of the claims).
fn encode_jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        "jti": ulid::Ulid::new().to_string(),
        "iat": unix_now(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign JWT");
    format!("{signed}.{}", b64(&signature))
}

fn operator_jwt(operator: &KeyPair, system_account: &KeyPair) -> String {
    encode_jwt(
        operator,
        &operator.public_key(),
        "mailroom-test-operator",
        json!({
            "type": "operator",
            "version": 2,
            "system_account": system_account.public_key(),
        }),
    )
}

/// An account JWT signed by `operator`, without limits (`-1` = unlimited) and with JetStream
/// when `jetstream` (JetStream is on for an account when `mem_storage` or `disk_storage` is
/// not 0).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1,
        "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(-1);
        }
    }
    encode_jwt(
        operator,
        &account.public_key(),
        name,
        json!({
            "type": "account",
            "version": 2,
            "limits": limits,
            "default_permissions": {"pub": {}, "sub": {}},
        }),
    )
}

/// A user JWT signed by `account` (no permission restrictions, no limits).
fn user_jwt(account: &KeyPair, user: &KeyPair) -> String {
    encode_jwt(
        account,
        &user.public_key(),
        "mailroom",
        json!({
            "type": "user",
            "version": 2,
            "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    )
}

/// Writes a `.creds` file in the format `nsc` produces.
fn write_creds(dir: &Path, file: &str, jwt: &str, user: &KeyPair) -> PathBuf {
    let seed = user.seed().expect("user seed");
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write creds file");
    path
}

/// `jwt` with its claims changed after signing (the signature no longer matches).
fn tampered(jwt: &str) -> String {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts");
    let claims = URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("claims are base64url");
    let mut claims: Value = serde_json::from_slice(&claims).expect("claims are JSON");
    claims["name"] = json!("mallory");
    format!(
        "{}.{}.{}",
        parts[0],
        b64(claims.to_string().as_bytes()),
        parts[2]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let account = KeyPair::new_account();
    let user = KeyPair::new_user();
    // Operator mode with the accounts preloaded in the server's memory resolver; debug level so
    // the log says why a client was refused.
    let server = nats(NatsServer::builder().extra_config(format!(
        "debug: true\n\
         operator: {operator_jwt}\n\
         system_account: {system_pub}\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n  {system_pub}: {system_jwt}\n  {account_pub}: {account_jwt}\n}}",
        operator_jwt = quoted(&operator_jwt(&operator, &system)),
        system_pub = system.public_key(),
        system_jwt = quoted(&account_jwt(&operator, &system, "SYS", false)),
        account_pub = account.public_key(),
        account_jwt = quoted(&account_jwt(&operator, &account, "MAILROOM", true)),
    )));
    let with_creds = |path: PathBuf| JetStreamOptions {
        auth: NatsAuth::CredentialsFile(path),
        ..options(&server)
    };

    let good_jwt = user_jwt(&account, &user);
    let creds = write_creds(dir.path(), "mailroom.creds", &good_jwt, &user);
    let queue = JetStreamQueue::connect(with_creds(creds))
        .await
        .expect("connect with a credentials file");
    assert!(queue.is_ready(), "ready with the user's credentials");
    let message = contract::message("a@example.org", &["x@one.example", "y@two.example"]);
    queue
        .enqueue(message.clone())
        .await
        .expect("enqueue with a credentials file");
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.by_domain.len(), 2);
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message)
    );
    assert!(
        !format!("{:?}", queue.options().auth).contains(&user.seed().expect("seed")),
        "Debug does not show the seed"
    );

    // The stream lives in the JWT account, with the JetStream the account JWT grants.
    let jsz = server
        .monitor_json("/jsz?accounts=true&streams=true")
        .expect("GET /jsz");
    let accounts = jsz["account_details"]
        .as_array()
        .expect("jsz account_details");
    let ours = accounts
        .iter()
        .find(|a| a["id"] == json!(account.public_key()))
        .unwrap_or_else(|| panic!("JetStream account {} in {jsz}", account.public_key()));
    assert_eq!(ours["name"], json!("MAILROOM"), "the account JWT's name");
    let streams: Vec<&str> = ours["stream_detail"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        streams.contains(&"MAILROOM"),
        "the queue stream is in the JWT account: {ours}"
    );

    // A user signed by an account the operator never signed (the server does not know it).
    let stranger_account = KeyPair::new_account();
    let stranger = KeyPair::new_user();
    let unknown_account = write_creds(
        dir.path(),
        "unknown-account.creds",
        &user_jwt(&stranger_account, &stranger),
        &stranger,
    );
    // The good JWT with its claims changed after signing.
    let forged = write_creds(dir.path(), "tampered.creds", &tampered(&good_jwt), &user);
    // The good JWT with the seed of another user (the nonce signature does not match).
    let wrong_seed = write_creds(
        dir.path(),
        "wrong-seed.creds",
        &good_jwt,
        &KeyPair::new_user(),
    );
    tokio::join!(
        assert_refused(with_creds(unknown_account), "user of an unknown account"),
        assert_refused(with_creds(forged), "tampered user JWT"),
        assert_refused(with_creds(wrong_seed), "JWT with another user's seed"),
    );
    // Each refused for its own reason (debug level; at info level all three are just
    // "authentication error"). A JWT that fails verification is not taken for a NATS JWT at
    // all, hence "requires a user JWT" for the tampered one.
    assert_logged(
        &server,
        &[
            "Account JWT lookup error: account missing",
            "Authentication requires a user JWT",
            "Signature not verified",
        ],
    );

    // The good credentials still work next to the refused ones.
    assert!(queue.is_ready());
    queue
        .enqueue(contract::message("b@example.org", &["z@one.example"]))
        .await
        .expect("enqueue after the refused attempts");
    assert_eq!(queue.stats().await.expect("stats").messages, 2);
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS
// ---------------------------------------------------------------------------------------------

/// A CA (certificate PEM, issuer for signing leaves).
fn new_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut params = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), rcgen::Issuer::new(params, key))
}

/// A leaf certificate signed by `ca`, written as `<name>.pem` / `<name>-key.pem`.
fn new_leaf(
    dir: &Path,
    name: &str,
    sans: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
    ca: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> (PathBuf, PathBuf) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(sans).expect("leaf params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, ca).expect("sign leaf");
    let cert_file = dir.join(format!("{name}.pem"));
    let key_file = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    (cert_file, key_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_pem, ca) = new_ca("Mailroom test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write CA");
    let (server_cert, server_key) = new_leaf(
        dir.path(),
        "server",
        &["127.0.0.1", "localhost"],
        ServerAuth,
        &ca,
    );
    let (client_cert, client_key) = new_leaf(dir.path(), "client", &["mailroom"], ClientAuth, &ca);
    // A client certificate from a CA the server does not trust.
    let (_, other_ca) = new_ca("Another CA");
    let (other_cert, other_key) =
        new_leaf(dir.path(), "other", &["mailroom"], ClientAuth, &other_ca);

    let server = nats(NatsServer::builder().extra_config(format!(
        "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n  timeout: 2\n}}",
        quoted_path(&server_cert),
        quoted_path(&server_key),
        quoted_path(&ca_file),
    )));
    let with_tls = |tls: NatsTls| JetStreamOptions {
        tls: Some(tls),
        ..options(&server)
    };

    let queue = JetStreamQueue::connect(with_tls(NatsTls {
        ca_file: Some(ca_file.clone()),
        cert_file: Some(client_cert),
        key_file: Some(client_key),
    }))
    .await
    .expect("connect with a client certificate");
    assert!(queue.is_ready(), "ready with a client certificate");
    let message = contract::message("a@example.org", &["x@one.example"]);
    queue
        .enqueue(message.clone())
        .await
        .expect("enqueue over mutual TLS");
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message)
    );

    tokio::join!(
        assert_refused(
            with_tls(NatsTls {
                ca_file: Some(ca_file.clone()),
                ..NatsTls::default()
            }),
            "no client certificate",
        ),
        assert_refused(
            with_tls(NatsTls {
                ca_file: Some(ca_file.clone()),
                cert_file: Some(other_cert),
                key_file: Some(other_key),
            }),
            "client certificate from an untrusted CA",
        ),
    );
    assert_logged(
        &server,
        &[
            "TLS handshake error: tls: client didn't provide a certificate",
            "TLS handshake error: tls: failed to verify certificate: x509: certificate signed by \
             unknown authority",
        ],
    );
    assert!(queue.is_ready(), "the good client is not affected");
}

// ---------------------------------------------------------------------------------------------
// Rollback of a partly refused enqueue
// ---------------------------------------------------------------------------------------------

async fn stream_state(js: &jetstream::Context) -> (u64, u64) {
    let state = js
        .get_stream("MAILROOM")
        .await
        .expect("get stream")
        .get_info()
        .await
        .expect("stream info")
        .state;
    (state.messages, state.last_sequence)
}

/// One failed enqueue (`ok.example` allowed, `denied.example` refused) and one that works, with
/// bodies inline (`inline_max: None`) or in the Object Store (`Some(0)`).
async fn refused_domain_rolls_back(
    server: &NatsServer,
    js: &jetstream::Context,
    inline_max: Option<usize>,
) {
    let what = if inline_max == Some(0) {
        "body object"
    } else {
        "inline body"
    };
    let queue = JetStreamQueue::connect(JetStreamOptions {
        auth: NatsAuth::UserPassword {
            user: "w".into(),
            password: "p".into(),
        },
        inline_max,
        ..options(server)
    })
    .await
    .expect("connect as the restricted user");
    assert!(queue.is_ready(), "{what}: ready");

    let (messages_before, last_before) = stream_state(js).await;
    let message = contract::message("a@example.org", &["x@ok.example", "y@denied.example"]);
    let id = message.envelope.id;
    let started = Instant::now();
    let result = queue.enqueue(message.clone()).await;
    let took = started.elapsed();
    eprintln!("{what}: refused enqueue took {took:?}: {result:?}");
    assert!(
        matches!(result, Err(QueueError::Unavailable(_))),
        "{what}: enqueue with a refused domain fails: {result:?}"
    );
    assert!(
        took <= PUBLISH_TIMEOUT + Duration::from_secs(3),
        "{what}: fails within publish_timeout plus the rollback: {took:?}"
    );
    let (messages_after, last_after) = stream_state(js).await;
    assert!(
        last_after > last_before,
        "{what}: the ok.example entry was stored ({last_before} -> {last_after})"
    );
    assert_eq!(
        messages_after, messages_before,
        "{what}: and deleted again by the rollback"
    );
    assert_eq!(
        queue.get(id).await.expect("get"),
        None,
        "{what}: nothing left"
    );
    assert!(
        object_gone(js, &id.to_string()).await,
        "{what}: no body object left"
    );
    assert!(
        !refs_key_present(js, &id.to_string()).await,
        "{what}: no reference count left"
    );

    // The same user can enqueue to the allowed domain.
    let allowed = contract::message("a@example.org", &["x@ok.example", "z@ok.example"]);
    queue
        .enqueue(allowed.clone())
        .await
        .expect("enqueue to the allowed domain only");
    assert_eq!(
        queue.get(allowed.envelope.id).await.expect("get"),
        Some(allowed.clone())
    );
    assert_eq!(stream_state(js).await.0, messages_before + 1);
    assert_eq!(
        object_gone(js, &allowed.envelope.id.to_string()).await,
        inline_max.is_none(),
        "{what}: the body is where it belongs"
    );
    assert_eq!(
        refs_key_present(js, &allowed.envelope.id.to_string()).await,
        inline_max.is_some(),
        "{what}: a reference count exactly for an object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_rolls_back_what_was_stored() {
    let denied = mailroom_queue::jetstream::entry_subject("MAILROOM", "default", "denied.example");
    assert_eq!(denied, "mailroom.q.default.denied.example");
    let server = nats(NatsServer::builder().extra_config(format!(
        "authorization {{\n  users: [\n    {{ user: w, password: p, permissions: {{ publish: \
         {{ allow: [\">\"], deny: [{}] }} }} }}\n    {{ user: admin, password: admin }}\n  ]\n}}",
        quoted(&denied)
    )));
    // An unrestricted client to look at what was stored.
    let admin = async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin".into())
        .connect(server.url())
        .await
        .expect("inspection client");
    let js = jetstream::new(admin);

    refused_domain_rolls_back(&server, &js, None).await;
    refused_domain_rolls_back(&server, &js, Some(0)).await;
    assert_logged(
        &server,
        &[&format!(
            "\"$G/user:w\" - Publish Violation - Subject \"{denied}\""
        )],
    );

    // Only the two allowed messages are left.
    let queue = JetStreamQueue::connect(JetStreamOptions {
        auth: NatsAuth::UserPassword {
            user: "w".into(),
            password: "p".into(),
        },
        ..options(&server)
    })
    .await
    .expect("connect as the restricted user");
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.messages, 2);
    assert_eq!(
        stats.by_domain.into_iter().collect::<Vec<_>>(),
        vec![("ok.example".to_string(), 2)]
    );
}
