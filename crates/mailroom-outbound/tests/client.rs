//! The SMTP client against real servers on loopback: Postfix's `smtp-sink` (pipelining,
//! connection reuse, dot-stuffing, its reject switches), Mailroom's own inbound listener
//! (STARTTLS and implicit TLS with rcgen certificates, SIZE, per-recipient outcomes, the stored
//! message byte for byte, SMTPUTF8, BDAT, AUTH), and a scripted fake server for the edge
//! cases no real server produces on demand (421 greeting, malformed replies, a server that
//! never answers the final dot, EHLO refused, STARTTLS gone wrong).
//!
//! Every wait is bounded: the client runs with 5-second timeouts (shorter where a timeout is
//! the point), and child processes are killed when their handle drops.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mailroom_config::{AuthMechanism, AuthSpec, ByteSize, ListenerSpec, TlsSpec};
use mailroom_inbound::{InboundDeps, Listener, Shutdown};
use mailroom_outbound::client::{
    ClientConfig, ClientError, Connection, Credentials, Missing, ProtocolError, RcptTo, ReplyClass,
    Stage, Target, Timeouts, TlsPolicy, TlsRoots, Transaction,
};
use mailroom_queue::local::{LocalOptions, LocalQueue};
use mailroom_queue::{Queue, QueueId, StoredMessage};
use mailroom_smtp::{Body, EnhancedCode, Notify, Orcpt, Reply, Ret};
use mailroom_telemetry::DeliveryLog;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Client helpers

fn config(tls: TlsPolicy) -> ClientConfig {
    let mut c = ClientConfig::new("client.test");
    c.tls = tls;
    c.timeouts = Timeouts {
        connect: WAIT,
        greeting: WAIT,
        command: WAIT,
        data_start: WAIT,
        data_block: WAIT,
        data_end: WAIT,
    };
    c
}

fn target(addr: SocketAddr, host: &str) -> Target {
    Target::new(addr.ip(), addr.port(), host)
}

async fn connect(addr: SocketAddr, host: &str, config: &ClientConfig) -> Connection {
    match Connection::connect(&target(addr, host), config).await {
        Ok(c) => c,
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

async fn connect_err(addr: SocketAddr, host: &str, config: &ClientConfig) -> ClientError {
    match Connection::connect(&target(addr, host), config).await {
        Ok(c) => panic!("connect to {addr} should fail, got {c:?}"),
        Err(e) => e,
    }
}

fn notify_all() -> Option<Notify> {
    Some(Notify {
        never: false,
        success: true,
        failure: true,
        delay: false,
    })
}

// ---------------------------------------------------------------------------------------------
// Postfix smtp-sink as a child process

/// A running `smtp-sink`, killed on drop; each transaction is dumped into `dump`.
struct Sink {
    child: Child,
    addr: SocketAddr,
    dump: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Sink {
    /// Starts `smtp-sink [extra] -d <dump>/msg. 127.0.0.1:<free port> 64`.
    fn start(extra: &[&str]) -> Sink {
        assert!(
            Path::new(SMTP_SINK).exists(),
            "{SMTP_SINK} not found: install Postfix to run these tests"
        );
        for _ in 0..5 {
            let dump = tempfile::tempdir().expect("tempdir");
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let mut cmd = Command::new(SMTP_SINK);
            if running_as_root() {
                // Required as root; stay root so the dump directory stays writable.
                cmd.args(["-u", "root"]);
            }
            cmd.args(extra)
                .arg("-d")
                .arg(format!("{}/msg.", dump.path().display()))
                .arg(addr.to_string())
                .arg("64")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd.spawn().expect("spawn smtp-sink");
            let mut sink = Sink { child, addr, dump };
            if sink.wait_ready() {
                return sink;
            }
        }
        panic!("smtp-sink did not start");
    }

    /// Waits until the port accepts connections; false when the process died (port taken).
    fn wait_ready(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The dumped transactions once `n` are complete (each ends with an empty line).
    async fn dumps(&self, n: usize) -> Vec<String> {
        let start = Instant::now();
        loop {
            let mut files: Vec<PathBuf> = std::fs::read_dir(self.dump.path())
                .expect("read dump dir")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            let texts: Vec<String> = files
                .iter()
                .filter_map(|f| std::fs::read_to_string(f).ok())
                .filter(|t| t.ends_with("\n\n"))
                .collect();
            if texts.len() >= n {
                return texts;
            }
            assert!(
                start.elapsed() < WAIT,
                "expected {n} dumped messages, have {}",
                texts.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The message part of an smtp-sink dump: after its three-line `Received:` header.
fn dumped_message(dump: &str) -> &str {
    let received = dump.find("\nReceived: ").expect("Received header in dump");
    let after = &dump[received + 1..];
    // "Received: from ...\n\tby ...\n\t<date>\n"
    let mut end = 0;
    for _ in 0..3 {
        end += after[end..].find('\n').expect("header line") + 1;
    }
    &after[end..]
}

// ---------------------------------------------------------------------------------------------
// Mailroom's inbound listener with a local spool

/// A running inbound listener; stopped on drop.
struct Receiver {
    addr: SocketAddr,
    queue: Arc<LocalQueue>,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

/// An `mx` listener for example.test named mx.test on 127.0.0.1:0.
fn spec() -> ListenerSpec {
    let mut s = ListenerSpec::new("test", "127.0.0.1:0");
    s.accepted_domains = vec!["example.test".into()];
    s.hostname = Some("mx.test".into());
    s
}

impl Receiver {
    async fn start(spec: ListenerSpec) -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Arc::new(
            LocalQueue::open(dir.path().join("spool"), LocalOptions::default())
                .await
                .expect("open spool"),
        );
        let deps = InboundDeps {
            queue: Arc::clone(&queue) as Arc<dyn Queue>,
            delivery_log: DeliveryLog::discard(),
            hostname: "mx.test".into(),
            shared: None,
        };
        let listener = Listener::bind(&spec, "listeners[0]", &deps)
            .await
            .expect("bind listener");
        let addr = listener.local_addr().expect("listener addr");
        let shutdown = Shutdown::default();
        tokio::spawn(listener.run(shutdown.clone()));
        Receiver {
            addr,
            queue,
            shutdown,
            _dir: dir,
        }
    }

    /// The message a `250 2.0.0 Ok: queued as <id>` reply refers to.
    async fn stored(&self, reply: &Reply) -> StoredMessage {
        let text = reply.text();
        let id: QueueId = text
            .rsplit(' ')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no queue id in {text:?}"));
        self.queue
            .get(id)
            .await
            .expect("queue get")
            .expect("the message is stored")
    }

    async fn queued(&self) -> u64 {
        self.queue.stats().await.expect("stats").messages
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.stop.cancel();
        self.shutdown.abort.cancel();
    }
}

/// The stored message without the receiver's own `Received:` field.
fn without_received(body: &[u8]) -> &[u8] {
    assert!(body.starts_with(b"Received: "), "no Received field first");
    let mut i = 0;
    while let Some(pos) = body[i..].windows(2).position(|w| w == b"\r\n") {
        i += pos + 2;
        if !matches!(body.get(i), Some(b' ' | b'\t')) {
            return &body[i..];
        }
    }
    panic!("unterminated Received field");
}

/// A self-signed certificate for `mx.test`, written into a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    cert_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ck = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()])
            .expect("self-signed certificate");
        let cert_pem = ck.cert.pem();
        std::fs::write(dir.path().join("tls.crt"), &cert_pem).expect("write cert");
        std::fs::write(dir.path().join("tls.key"), ck.signing_key.serialize_pem())
            .expect("write key");
        Pki { dir, cert_pem }
    }

    fn tls_spec(&self, implicit: bool) -> TlsSpec {
        let mut t = TlsSpec::new(
            self.dir.path().join("tls.crt").display().to_string(),
            self.dir.path().join("tls.key").display().to_string(),
        );
        t.implicit = implicit;
        t
    }

    fn roots(&self) -> TlsRoots {
        TlsRoots::from_pem(self.cert_pem.as_bytes()).expect("roots from the certificate")
    }

    /// A users file with alice / s3cret (bcrypt) and an AUTH section using it.
    fn auth_spec(&self, mechanisms: Vec<AuthMechanism>) -> AuthSpec {
        let hash = bcrypt::hash("s3cret", 4).expect("bcrypt");
        let users = self.dir.path().join("users");
        std::fs::write(&users, format!("alice:{hash}\n")).expect("users file");
        let mut a = AuthSpec::new(users.display().to_string());
        a.mechanisms = mechanisms;
        a
    }
}

async fn tls_receiver(pki: &Pki, implicit: bool) -> Receiver {
    let mut s = spec();
    s.tls = Some(pki.tls_spec(implicit));
    Receiver::start(s).await
}

// ---------------------------------------------------------------------------------------------
// A scripted fake server for edge cases

/// One step of a fake server's script.
enum Step {
    /// Read this many lines, then send the text (`\n` separates lines, CRLF is added); an
    /// empty text means: answer nothing any more, just read until the client leaves.
    Read(usize, &'static str),
    /// Read message lines up to the lone `.`, then answer like `Read`.
    Body(&'static str),
    /// Close the connection now.
    Close,
}

/// Serves one connection by its script and records every line the client sent.
struct Fake {
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn wire(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Fake {
    async fn start(script: Vec<Step>) -> Fake {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind fake");
        let addr = listener.local_addr().expect("fake addr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&lines);
        let task = tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut next_line = async || -> Option<String> {
                let mut buf = Vec::new();
                match tokio::time::timeout(WAIT, read.read_until(b'\n', &mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_owned();
                        record
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(line.clone());
                        Some(line)
                    }
                    _ => None,
                }
            };
            for step in script {
                let reply = match step {
                    Step::Read(n, reply) => {
                        for _ in 0..n {
                            if next_line().await.is_none() {
                                return;
                            }
                        }
                        reply
                    }
                    Step::Body(reply) => {
                        loop {
                            match next_line().await.as_deref() {
                                None => return,
                                Some(".") => break,
                                Some(_) => {}
                            }
                        }
                        reply
                    }
                    Step::Close => return,
                };
                if reply.is_empty() {
                    break;
                }
                if write.write_all(&wire(reply)).await.is_err() {
                    return;
                }
            }
            // Record whatever else comes (QUIT, or nothing) until the client closes.
            while next_line().await.is_some() {}
        });
        Fake { addr, lines, task }
    }

    /// The lines the client sent, once it has gone.
    async fn lines(self) -> Vec<String> {
        let _ = tokio::time::timeout(WAIT, self.task).await;
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

const GREETING: Step = Step::Read(0, "220 fake.test ESMTP");

// ---------------------------------------------------------------------------------------------
// smtp-sink

#[tokio::test]
async fn sink_pipelined_send_arrives_dot_stuffed_and_crlf_normalized() {
    let sink = Sink::start(&[]);
    let mut conn = connect(sink.addr, "sink.test", &config(TlsPolicy::Opportunistic)).await;
    let caps = conn.capabilities().clone();
    assert!(
        caps.pipelining && caps.dsn && caps.eight_bit_mime,
        "{caps:?}"
    );
    assert!(conn.tls_info().is_none(), "no STARTTLS offered: plaintext");
    assert_eq!(conn.greeting().code, 220);

    let mut tx = Transaction::new("sender@client.test", ["a@sink.test", "b@sink.test"]);
    tx.body_type = Some(Body::EightBitMime);
    tx.recipients[0].notify = notify_all();
    let body = b"Subject: sink\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nbare lf\nlast line";
    let outcome = conn.send(&tx, body).await.expect("send");
    assert!(outcome.all_delivered(), "{outcome:?}");
    assert_eq!(outcome.data.as_ref().map(|r| r.code), Some(250));
    assert_eq!(conn.messages_sent(), 1);
    conn.quit().await.expect("quit");

    let dumps = sink.dumps(1).await;
    let dump = &dumps[0];
    assert!(
        dump.contains("X-Mail-Args: <sender@client.test> BODY=8BITMIME\n"),
        "no SIZE (not offered), BODY (8BITMIME offered): {dump}"
    );
    assert!(
        dump.contains("X-Rcpt-Args: <a@sink.test> NOTIFY=SUCCESS,FAILURE\n")
            && dump.contains("X-Rcpt-Args: <b@sink.test>\n"),
        "{dump}"
    );
    assert!(dump.contains("X-Helo-Args: client.test\n"), "{dump}");
    // smtp-sink writes LF line ends and an empty line after the message.
    assert_eq!(
        dumped_message(dump),
        "Subject: sink\n\n.leading dot\n..two dots\n.\nbare lf\nlast line\n\n"
    );
}

#[tokio::test]
async fn sink_carries_several_messages_over_one_connection() {
    let sink = Sink::start(&[]);
    let mut conn = connect(sink.addr, "sink.test", &config(TlsPolicy::Disabled)).await;
    for i in 0..3 {
        if i > 0 {
            conn.reset().await.expect("RSET before reuse");
        }
        let tx = Transaction::new(format!("s{i}@client.test"), [format!("r{i}@sink.test")]);
        let body = format!("Subject: message {i}\r\n\r\nbody {i}\r\n");
        let outcome = conn.send(&tx, body.as_bytes()).await.expect("send");
        assert!(outcome.all_delivered(), "{outcome:?}");
    }
    assert_eq!(conn.messages_sent(), 3);
    assert!(conn.is_usable());
    conn.quit().await.expect("quit");
    let dumps = sink.dumps(3).await;
    for i in 0..3 {
        assert!(
            dumps.iter().any(
                |d| d.contains(&format!("X-Mail-Args: <s{i}@client.test>\n"))
                    && d.contains(&format!("\nbody {i}\n"))
            ),
            "message {i} missing: {dumps:?}"
        );
    }
}

#[tokio::test]
async fn sink_soft_rejects_every_recipient_without_pipelining() {
    // -r RCPT: every RCPT gets 450 4.3.0 (and PIPELINING is not offered).
    let sink = Sink::start(&["-r", "RCPT"]);
    let mut conn = connect(sink.addr, "sink.test", &config(TlsPolicy::Disabled)).await;
    assert!(!conn.capabilities().pipelining);
    let tx = Transaction::new("s@client.test", ["a@sink.test", "b@sink.test"]);
    let outcome = conn
        .send(&tx, b"Subject: x\r\n\r\nx\r\n")
        .await
        .expect("send");
    assert_eq!(outcome.mail.as_ref().map(|r| r.code), Some(250));
    assert_eq!(outcome.data, None, "no DATA without an accepted recipient");
    for r in &outcome.recipients {
        assert_eq!(r.class(), ReplyClass::Deferred, "{r:?}");
        assert_eq!(r.reply.code, 450);
        assert_eq!(r.reply.enhanced, Some(EnhancedCode(4, 3, 0)));
    }
    assert!(conn.is_usable(), "the transaction was reset");
    conn.reset().await.expect("RSET");
    assert_eq!(conn.messages_sent(), 0);
    conn.quit().await.expect("quit");
}

#[tokio::test]
async fn sink_hard_rejected_mail_is_permanent_and_keeps_the_connection() {
    // -f MAIL: MAIL gets 500 5.3.0.
    let sink = Sink::start(&["-f", "MAIL"]);
    let mut conn = connect(sink.addr, "sink.test", &config(TlsPolicy::Disabled)).await;
    let tx = Transaction::new("s@client.test", ["a@sink.test"]);
    let err = conn.send(&tx, b"x\r\n").await.expect_err("MAIL is refused");
    assert!(
        matches!(&err, ClientError::UnexpectedReply { stage: Stage::Mail, reply, .. } if reply.code == 500),
        "{err:?}"
    );
    assert!(err.is_permanent() && !err.try_next_host());
    assert_eq!(err.status(), EnhancedCode(5, 3, 0));
    assert!(err.to_string().contains("(in reply to MAIL FROM)"), "{err}");
    assert!(conn.is_usable());
    conn.reset().await.expect("still talking");
    conn.quit().await.expect("quit");
}

#[tokio::test]
async fn sink_421_at_rcpt_is_transient_and_ends_the_connection() {
    // -Q RCPT: 421 and disconnect at RCPT.
    let sink = Sink::start(&["-Q", "RCPT"]);
    let mut conn = connect(sink.addr, "sink.test", &config(TlsPolicy::Disabled)).await;
    let tx = Transaction::new("s@client.test", ["a@sink.test"]);
    let err = conn.send(&tx, b"x\r\n").await.expect_err("421");
    assert!(
        matches!(&err, ClientError::UnexpectedReply { stage: Stage::Rcpt, reply, .. } if reply.code == 421),
        "{err:?}"
    );
    assert!(!err.is_permanent());
    assert!(!conn.is_usable());
    assert!(matches!(
        conn.send(&tx, b"x\r\n").await,
        Err(ClientError::Unusable { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Mailroom inbound: TLS

#[tokio::test]
async fn opportunistic_starttls_accepts_a_self_signed_certificate() {
    let pki = Pki::new();
    let receiver = tls_receiver(&pki, false).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Opportunistic)).await;
    let info = conn.tls_info().cloned().expect("TLS is on");
    assert!(!info.verified && !info.implicit, "{info:?}");
    assert_eq!(info.protocol, "TLSv1.3");
    assert!(info.cipher_suite.starts_with("TLS13_"), "{info:?}");
    assert!(
        !conn.capabilities().starttls,
        "capabilities come from the EHLO over TLS"
    );
    let tx = Transaction::new("s@client.test", ["r@example.test"]);
    let outcome = conn
        .send(&tx, b"Subject: tls\r\n\r\nsecret\r\n")
        .await
        .expect("send");
    assert!(outcome.all_delivered(), "{outcome:?}");
    let stored = receiver
        .stored(outcome.data.as_ref().expect("data reply"))
        .await;
    assert!(
        String::from_utf8_lossy(&stored.body).contains("with ESMTPS id"),
        "received over TLS"
    );
    conn.quit().await.expect("quit");
}

#[tokio::test]
async fn required_tls_verifies_the_certificate_against_the_roots() {
    let pki = Pki::new();
    let receiver = tls_receiver(&pki, false).await;

    // No roots: the self-signed certificate cannot verify.
    let err = connect_err(receiver.addr, "mx.test", &config(TlsPolicy::Required)).await;
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert!(!err.is_permanent() && err.try_next_host());
    assert_eq!(err.status(), EnhancedCode(4, 7, 5));

    // Some other certificate as root (same rcgen subject name, different key).
    let mut other = config(TlsPolicy::Required);
    other.roots = Pki::new().roots();
    let err = connect_err(receiver.addr, "mx.test", &other).await;
    assert!(
        matches!(&err, ClientError::Tls { reason, .. } if reason.contains("invalid peer certificate")),
        "{err:?}"
    );

    // The certificate as root, but the wrong host name.
    let mut required = config(TlsPolicy::Required);
    required.roots = pki.roots();
    let err = connect_err(receiver.addr, "other.test", &required).await;
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");

    // The certificate as root and the right name: verified.
    let mut conn = connect(receiver.addr, "mx.test", &required).await;
    let info = conn.tls_info().expect("TLS");
    assert!(info.verified, "{info:?}");
    let tx = Transaction::new("s@client.test", ["r@example.test"]);
    assert!(
        conn.send(&tx, b"x\r\n")
            .await
            .expect("send")
            .all_delivered()
    );

    // A relay with verifyCertificate: false still gets TLS, unverified.
    let mut unverified = config(TlsPolicy::Required);
    unverified.verify_certificates = false;
    let conn = connect(receiver.addr, "mx.test", &unverified).await;
    assert!(conn.tls_info().is_some_and(|i| !i.verified));
}

#[tokio::test]
async fn required_tls_defers_when_starttls_is_not_offered() {
    let receiver = Receiver::start(spec()).await;
    let err = connect_err(receiver.addr, "mx.test", &config(TlsPolicy::Required)).await;
    assert!(matches!(err, ClientError::TlsNotOffered { .. }), "{err:?}");
    assert!(!err.is_permanent() && err.try_next_host());
    assert_eq!(err.status(), EnhancedCode(4, 7, 4));
    assert!(
        err.to_string()
            .ends_with("(mx.test): TLS is required, but the server does not offer STARTTLS"),
        "{err}"
    );
}

#[tokio::test]
async fn disabled_tls_never_sends_starttls() {
    let pki = Pki::new();
    let receiver = tls_receiver(&pki, false).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Disabled)).await;
    assert!(conn.capabilities().starttls, "offered");
    assert!(conn.tls_info().is_none(), "but not used");
    let tx = Transaction::new("s@client.test", ["r@example.test"]);
    let outcome = conn.send(&tx, b"x\r\n").await.expect("send");
    let stored = receiver
        .stored(outcome.data.as_ref().expect("data reply"))
        .await;
    assert!(
        String::from_utf8_lossy(&stored.body).contains("with ESMTP id"),
        "received in plaintext"
    );
}

#[tokio::test]
async fn implicit_tls_from_the_first_byte() {
    let pki = Pki::new();
    let receiver = tls_receiver(&pki, true).await;
    let mut c = config(TlsPolicy::Implicit);
    c.roots = pki.roots();
    let mut conn = connect(receiver.addr, "mx.test", &c).await;
    let info = conn.tls_info().expect("TLS");
    assert!(info.implicit && info.verified, "{info:?}");
    assert!(!conn.capabilities().starttls);
    let tx = Transaction::new("s@client.test", ["r@example.test"]);
    assert!(
        conn.send(&tx, b"x\r\n")
            .await
            .expect("send")
            .all_delivered()
    );
    conn.quit().await.expect("quit");
}

// ---------------------------------------------------------------------------------------------
// Mailroom inbound: transactions

#[tokio::test]
async fn per_recipient_outcomes_and_the_stored_message_byte_for_byte() {
    let receiver = Receiver::start(spec()).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Disabled)).await;
    assert!(conn.capabilities().pipelining && conn.capabilities().dsn);
    let tx = Transaction {
        sender: "sender@client.test".into(),
        recipients: vec![
            RcptTo {
                address: "ok@example.test".into(),
                notify: notify_all(),
                orcpt: Some(Orcpt {
                    addr_type: "rfc822".into(),
                    addr: "original+tag@example.test".into(),
                }),
            },
            RcptTo::new("someone@elsewhere.test"),
        ],
        body_type: Some(Body::EightBitMime),
        smtputf8: false,
        ret: Some(Ret::Hdrs),
        envid: Some("env id 42".into()),
    };
    let body: &[u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n\
                        bare lf\nline\r\n\xc3\xa9t\xc3\xa9 8bit\r\nno final crlf";
    let outcome = conn.send(&tx, body).await.expect("send");

    let [ok, relay] = outcome.recipients.as_slice() else {
        panic!("two outcomes: {outcome:?}");
    };
    assert_eq!(ok.class(), ReplyClass::Delivered);
    assert!(ok.accepted());
    assert_eq!(relay.class(), ReplyClass::Failed);
    assert_eq!(relay.reply.code, 550);
    assert_eq!(relay.reply.enhanced, Some(EnhancedCode(5, 7, 1)));
    assert!(!relay.accepted());

    let stored = receiver
        .stored(outcome.data.as_ref().expect("data reply"))
        .await;
    assert_eq!(
        without_received(&stored.body),
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n\
          bare lf\r\nline\r\n\xc3\xa9t\xc3\xa9 8bit\r\nno final crlf\r\n",
    );
    let env = &stored.envelope;
    assert_eq!(env.sender, "sender@client.test");
    assert_eq!(env.recipients.len(), 1, "only the accepted recipient");
    assert_eq!(env.recipients[0].address, "ok@example.test");
    assert_eq!(env.recipients[0].notify, notify_all());
    assert_eq!(
        env.recipients[0].orcpt.as_ref().map(|o| o.addr.as_str()),
        Some("original+tag@example.test")
    );
    assert_eq!(env.body_type, Some(Body::EightBitMime));
    assert_eq!(env.ret, Some(Ret::Hdrs));
    assert_eq!(env.envid.as_deref(), Some("env id 42"));
    assert_eq!(receiver.queued().await, 1);
    conn.quit().await.expect("quit");
}

#[tokio::test]
async fn a_long_recipient_list_is_pipelined_in_groups() {
    // ~45 KB of RCPT commands: several pipelined writes, each group's replies read before the
    // next is written.
    let mut s = spec();
    s.limits.max_recipients = 1000;
    let receiver = Receiver::start(s).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Disabled)).await;
    let recipients: Vec<String> = (0..600)
        .map(|i| format!("recipient-number-{i:04}-with-a-long-local-part@example.test"))
        .collect();
    let tx = Transaction::new("s@client.test", recipients.clone());
    let send = conn.send(&tx, b"Subject: many\r\n\r\nhi\r\n");
    assert_send(&send);
    let outcome = send.await.expect("send");
    assert!(outcome.all_delivered(), "{:?}", outcome.recipients.first());
    assert_eq!(outcome.recipients.len(), 600);
    let stored = receiver
        .stored(outcome.data.as_ref().expect("data reply"))
        .await;
    let stored: Vec<&str> = stored
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(stored, recipients);
}

/// Delivery workers spawn their sends.
fn assert_send<T: Send>(_: &T) {}

#[tokio::test]
async fn size_limit_refuses_before_sending_and_keeps_the_connection() {
    let mut s = spec();
    s.limits.max_message_size = ByteSize::from_bytes(2048);
    let receiver = Receiver::start(s).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Disabled)).await;
    assert_eq!(conn.capabilities().max_size(), Some(2048));
    let tx = Transaction::new("s@client.test", ["r@example.test"]);
    let big = vec![b'x'; 4096];
    let err = conn.send(&tx, &big).await.expect_err("too large");
    assert!(
        matches!(
            err,
            ClientError::TooLarge {
                size: 4098,
                limit: 2048,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_permanent());
    assert_eq!(err.status(), EnhancedCode(5, 3, 4));
    assert!(conn.is_usable());
    let outcome = conn.send(&tx, b"small\r\n").await.expect("send");
    assert!(outcome.all_delivered());
    assert_eq!(receiver.queued().await, 1, "only the small message");
}

#[tokio::test]
async fn smtputf8_is_used_when_needed_and_offered() {
    let receiver = Receiver::start(spec()).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Disabled)).await;
    assert!(conn.capabilities().smtputf8);
    let tx = Transaction::new("s@client.test", ["j\u{f6}rg@example.test"]);
    let outcome = conn
        .send(&tx, "Subject: gr\u{fc}\u{df}e\r\n\r\nhi\r\n".as_bytes())
        .await
        .expect("send");
    assert!(outcome.all_delivered(), "{outcome:?}");
    let stored = receiver
        .stored(outcome.data.as_ref().expect("data reply"))
        .await;
    assert!(stored.envelope.smtputf8);
    assert_eq!(
        stored.envelope.recipients[0].address,
        "j\u{f6}rg@example.test"
    );
}

#[tokio::test]
async fn binarymime_goes_with_bdat_unchanged() {
    let receiver = Receiver::start(spec()).await;
    let mut conn = connect(receiver.addr, "mx.test", &config(TlsPolicy::Disabled)).await;
    let mut tx = Transaction::new("s@client.test", ["r@example.test"]);
    tx.body_type = Some(Body::BinaryMime);
    let body: &[u8] = b"Subject: bin\r\n\r\n\x00\x01\xff\n.\nraw\r.\r\nend";
    let outcome = conn.send(&tx, body).await.expect("send");
    assert!(outcome.all_delivered(), "{outcome:?}");
    let stored = receiver
        .stored(outcome.data.as_ref().expect("BDAT reply"))
        .await;
    assert_eq!(without_received(&stored.body), body);
    assert_eq!(stored.envelope.body_type, Some(Body::BinaryMime));
}

// ---------------------------------------------------------------------------------------------
// Mailroom inbound: AUTH

#[tokio::test]
async fn auth_over_starttls_allows_relaying() {
    let pki = Pki::new();
    for mechanisms in [
        vec![AuthMechanism::Plain, AuthMechanism::Login],
        vec![AuthMechanism::Login],
    ] {
        let mut s = spec();
        s.tls = Some(pki.tls_spec(false));
        s.auth = Some(pki.auth_spec(mechanisms.clone()));
        let receiver = Receiver::start(s).await;
        let mut c = config(TlsPolicy::Required);
        c.roots = pki.roots();
        c.credentials = Some(Credentials::new("alice", "s3cret"));
        let mut conn = connect(receiver.addr, "mx.test", &c).await;
        // Relaying to a foreign domain needs the authentication.
        let tx = Transaction::new("alice@client.test", ["friend@faraway.test"]);
        let outcome = conn
            .send(&tx, b"Subject: relay\r\n\r\nhi\r\n")
            .await
            .expect("send");
        assert!(outcome.all_delivered(), "{mechanisms:?}: {outcome:?}");
        let stored = receiver
            .stored(outcome.data.as_ref().expect("data reply"))
            .await;
        assert_eq!(stored.envelope.auth_user.as_deref(), Some("alice"));

        c.credentials = Some(Credentials::new("alice", "wrong"));
        let err = connect_err(receiver.addr, "mx.test", &c).await;
        assert!(
            matches!(&err, ClientError::UnexpectedReply { stage: Stage::Auth, reply, .. } if reply.code == 535),
            "{mechanisms:?}: {err:?}"
        );
        assert!(!err.is_permanent(), "a wrong password defers");
    }
}

#[tokio::test]
async fn credentials_are_never_sent_without_tls() {
    // Mailroom offers no AUTH in plaintext anyway; the client refuses first.
    let pki = Pki::new();
    let mut s = spec();
    s.tls = Some(pki.tls_spec(false));
    s.auth = Some(pki.auth_spec(vec![AuthMechanism::Plain]));
    let receiver = Receiver::start(s).await;
    let mut c = config(TlsPolicy::Disabled);
    c.credentials = Some(Credentials::new("alice", "s3cret"));
    let err = connect_err(receiver.addr, "mx.test", &c).await;
    assert!(
        matches!(&err, ClientError::AuthUnavailable { reason, .. } if reason.contains("without TLS")),
        "{err:?}"
    );

    // A server that offers AUTH in plaintext (as a STARTTLS-stripping attacker would).
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250 AUTH PLAIN LOGIN"),
    ])
    .await;
    let err = connect_err(fake.addr, "fake.test", &c).await;
    assert!(
        matches!(err, ClientError::AuthUnavailable { .. }),
        "{err:?}"
    );
    let lines = fake.lines().await;
    assert_eq!(lines, ["EHLO client.test"], "no AUTH line was sent");
}

// ---------------------------------------------------------------------------------------------
// Scripted edge cases

#[tokio::test]
async fn pipelined_rcpt_with_4xx_defers_only_that_recipient() {
    // The server reads MAIL, both RCPTs and DATA before answering anything: a client that
    // waited for the MAIL reply would time out here.
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250-PIPELINING\n250 ENHANCEDSTATUSCODES"),
        Step::Read(
            4,
            "250 2.1.0 ok\n250 2.1.5 ok\n451 4.2.0 mailbox busy\n354 go ahead",
        ),
        Step::Body("250 2.0.0 queued"),
        Step::Read(1, "221 2.0.0 bye"),
    ])
    .await;
    let mut conn = connect(fake.addr, "fake.test", &config(TlsPolicy::Disabled)).await;
    let tx = Transaction::new("s@client.test", ["a@fake.test", "b@fake.test"]);
    let outcome = conn
        .send(&tx, b"Subject: x\r\n\r\nhi\r\n")
        .await
        .expect("send");
    let classes: Vec<_> = outcome.recipients.iter().map(|r| r.class()).collect();
    assert_eq!(classes, [ReplyClass::Delivered, ReplyClass::Deferred]);
    assert_eq!(outcome.recipients[0].reply.text(), "queued");
    assert_eq!(outcome.recipients[1].reply.text(), "mailbox busy");
    conn.quit().await.expect("quit");
    assert_eq!(
        fake.lines().await,
        [
            "EHLO client.test",
            "MAIL FROM:<s@client.test>",
            "RCPT TO:<a@fake.test>",
            "RCPT TO:<b@fake.test>",
            "DATA",
            "Subject: x",
            "",
            "hi",
            ".",
            "QUIT",
        ]
    );
}

#[tokio::test]
async fn a_refused_data_command_decides_for_the_accepted_recipients() {
    // Pipelined: 421 to DATA defers the accepted recipient and ends the connection.
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250 PIPELINING"),
        Step::Read(
            4,
            "250 ok\n250 ok\n550 5.1.1 no such user\n421 4.3.2 shutting down",
        ),
    ])
    .await;
    let mut conn = connect(fake.addr, "fake.test", &config(TlsPolicy::Disabled)).await;
    let tx = Transaction::new("s@client.test", ["a@fake.test", "b@fake.test"]);
    let outcome = conn.send(&tx, b"x\r\n").await.expect("send");
    let classes: Vec<_> = outcome.recipients.iter().map(|r| r.class()).collect();
    assert_eq!(classes, [ReplyClass::Deferred, ReplyClass::Failed]);
    assert_eq!(outcome.recipients[0].response(), "421 4.3.2 shutting down");
    assert!(!conn.is_usable());
    conn.quit().await.expect("close");
    assert_eq!(fake.lines().await.last().map(String::as_str), Some("DATA"));

    // One by one: 554 to DATA fails the accepted recipient; RSET keeps the connection.
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250 fake.test"),
        Step::Read(1, "250 ok"),
        Step::Read(1, "250 ok"),
        Step::Read(1, "554 5.6.0 no thanks"),
        Step::Read(1, "250 reset"),
        Step::Read(1, "221 bye"),
    ])
    .await;
    let mut conn = connect(fake.addr, "fake.test", &config(TlsPolicy::Disabled)).await;
    let tx = Transaction::new("s@client.test", ["a@fake.test"]);
    let outcome = conn.send(&tx, b"x\r\n").await.expect("send");
    assert_eq!(outcome.recipients[0].class(), ReplyClass::Failed);
    assert_eq!(outcome.data.as_ref().map(|r| r.code), Some(554));
    assert!(conn.is_usable());
    conn.quit().await.expect("quit");
    assert_eq!(
        fake.lines().await,
        [
            "EHLO client.test",
            "MAIL FROM:<s@client.test>",
            "RCPT TO:<a@fake.test>",
            "DATA",
            "RSET",
            "QUIT"
        ]
    );
}

#[tokio::test]
async fn greeting_refusals_are_transient_for_the_message() {
    for greeting in ["421 4.3.2 fake.test busy", "554 5.7.1 go away"] {
        let fake = Fake::start(vec![Step::Read(0, greeting)]).await;
        let err = connect_err(fake.addr, "fake.test", &config(TlsPolicy::Disabled)).await;
        assert!(
            matches!(
                &err,
                ClientError::UnexpectedReply {
                    stage: Stage::Greeting,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_permanent(), "{greeting}: try elsewhere or later");
        assert!(err.try_next_host());
        assert_eq!(
            err.to_string(),
            format!(
                "{} (fake.test) said: {greeting} (in reply to the greeting)",
                fake.addr
            )
        );
        assert_eq!(fake.lines().await, ["QUIT"]);
    }
}

#[tokio::test]
async fn no_reply_to_the_final_dot_times_out_and_ends_the_connection() {
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250 PIPELINING"),
        Step::Read(3, "250 ok\n250 ok\n354 go"),
        Step::Body(""),
    ])
    .await;
    let mut c = config(TlsPolicy::Disabled);
    c.timeouts.data_end = Duration::from_millis(300);
    let mut conn = connect(fake.addr, "fake.test", &c).await;
    let tx = Transaction::new("s@client.test", ["a@fake.test"]);
    let start = Instant::now();
    let err = conn.send(&tx, b"x\r\n").await.expect_err("timeout");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        matches!(err, ClientError::Timeout { stage: Stage::DataEnd, after, .. } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(!err.is_permanent() && !err.try_next_host());
    assert!(
        err.to_string()
            .ends_with("timed out after 300ms waiting for the reply to end of DATA"),
        "{err}"
    );
    assert!(!conn.is_usable());
    assert!(matches!(
        conn.send(&tx, b"x\r\n").await,
        Err(ClientError::Unusable { .. })
    ));
    conn.quit().await.expect("no QUIT on a broken connection");
    let lines = fake.lines().await;
    assert_eq!(lines.last().map(String::as_str), Some("."), "{lines:?}");
}

#[tokio::test]
async fn malformed_and_overlong_replies_are_protocol_errors() {
    let fake = Fake::start(vec![GREETING, Step::Read(1, "250-fake.test\n25O garbage")]).await;
    let err = connect_err(fake.addr, "fake.test", &config(TlsPolicy::Disabled)).await;
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                stage: Stage::Ehlo,
                error: ProtocolError::Malformed,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_permanent() && err.try_next_host());

    let long: &'static str = Box::leak(format!("220 {}", "x".repeat(500)).into_boxed_str());
    let fake = Fake::start(vec![Step::Read(0, long)]).await;
    let mut c = config(TlsPolicy::Disabled);
    c.max_reply_line = 100;
    let err = connect_err(fake.addr, "fake.test", &c).await;
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                stage: Stage::Greeting,
                error: ProtocolError::LineTooLong { max: 100 },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo_without_extensions() {
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "502 5.5.1 EHLO not implemented"),
        Step::Read(1, "250 fake.test"),
        Step::Read(1, "250 ok"),
        Step::Read(1, "250 ok"),
        Step::Read(1, "354 go"),
        Step::Body("250 queued"),
        Step::Read(1, "221 bye"),
    ])
    .await;
    let mut conn = connect(fake.addr, "fake.test", &config(TlsPolicy::Opportunistic)).await;
    assert!(!conn.capabilities().esmtp);
    let mut tx = Transaction::new("s@client.test", ["a@fake.test"]);
    tx.body_type = Some(Body::EightBitMime);
    tx.recipients[0].notify = notify_all();
    let outcome = conn.send(&tx, b"..dot\n").await.expect("send");
    assert!(outcome.all_delivered());
    conn.quit().await.expect("quit");
    assert_eq!(
        fake.lines().await,
        [
            "EHLO client.test",
            "HELO client.test",
            "MAIL FROM:<s@client.test>",
            "RCPT TO:<a@fake.test>",
            "DATA",
            "...dot",
            ".",
            "QUIT",
        ],
        "no parameters, one command at a time"
    );
}

#[tokio::test]
async fn smtputf8_needed_but_not_offered_fails_before_mail() {
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250-PIPELINING\n250 8BITMIME"),
        Step::Read(1, "221 bye"),
    ])
    .await;
    let mut conn = connect(fake.addr, "fake.test", &config(TlsPolicy::Disabled)).await;
    let tx = Transaction::new("s@client.test", ["j\u{f6}rg@fake.test"]);
    let err = conn.send(&tx, b"x\r\n").await.expect_err("needs SMTPUTF8");
    assert!(
        matches!(
            err,
            ClientError::Unsupported {
                missing: Missing::Smtputf8Address,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_permanent());
    assert_eq!(err.status(), EnhancedCode(5, 6, 7));
    assert!(err.to_string().contains("does not offer SMTPUTF8"), "{err}");
    assert!(conn.is_usable());
    conn.quit().await.expect("quit");
    assert_eq!(fake.lines().await, ["EHLO client.test", "QUIT"]);
}

#[tokio::test]
async fn failed_starttls_handshake_is_a_transient_tls_error() {
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250 STARTTLS"),
        Step::Read(1, "220 go ahead"),
        Step::Close,
    ])
    .await;
    let err = connect_err(fake.addr, "fake.test", &config(TlsPolicy::Opportunistic)).await;
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert!(!err.is_permanent() && err.try_next_host());

    // A 454 to STARTTLS: opportunistic goes on in plaintext, required does not.
    let script = || {
        vec![
            GREETING,
            Step::Read(1, "250-fake.test\n250 STARTTLS"),
            Step::Read(1, "454 4.7.0 TLS not available"),
            Step::Read(1, "221 bye"),
        ]
    };
    let fake = Fake::start(script()).await;
    let conn = connect(fake.addr, "fake.test", &config(TlsPolicy::Opportunistic)).await;
    assert!(conn.tls_info().is_none());
    conn.quit().await.expect("quit");
    assert_eq!(fake.lines().await, ["EHLO client.test", "STARTTLS", "QUIT"]);
    let fake = Fake::start(script()).await;
    let err = connect_err(fake.addr, "fake.test", &config(TlsPolicy::Required)).await;
    assert!(
        matches!(&err, ClientError::UnexpectedReply { stage: Stage::StartTls, reply, .. } if reply.code == 454),
        "{err:?}"
    );
}

#[tokio::test]
async fn replies_injected_after_starttls_are_refused() {
    let fake = Fake::start(vec![
        GREETING,
        Step::Read(1, "250-fake.test\n250 STARTTLS"),
        // The 220 and a forged reply in one write: a client that kept its read buffer would
        // take the forgery for the first reply inside TLS.
        Step::Read(1, "220 go ahead\n250 injected"),
    ])
    .await;
    let err = connect_err(fake.addr, "fake.test", &config(TlsPolicy::Opportunistic)).await;
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                stage: Stage::StartTls,
                error: ProtocolError::DataAfterStartTls,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn refused_connection_names_the_peer() {
    let port = free_port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let err = connect_err(addr, "closed.test", &config(TlsPolicy::Opportunistic)).await;
    assert_eq!(
        err.to_string(),
        format!("connect to 127.0.0.1:{port} (closed.test): connection refused")
    );
    assert!(!err.is_permanent() && err.try_next_host());
    assert_eq!(err.stage(), Some(Stage::Connect));
    assert_eq!(err.status(), EnhancedCode(4, 4, 1));
}

#[tokio::test]
async fn invalid_helo_name_is_refused_before_connecting() {
    let err = connect_err(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 9)),
        "x.test",
        &config_with_helo("bad name\r\nRSET"),
    )
    .await;
    assert!(matches!(err, ClientError::InvalidConfig { .. }), "{err:?}");
}

fn config_with_helo(helo: &str) -> ClientConfig {
    let mut c = config(TlsPolicy::Disabled);
    c.helo_name = helo.to_owned();
    c
}
