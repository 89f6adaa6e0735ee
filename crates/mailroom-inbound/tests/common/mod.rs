//! Test kit for transcript tests: a real listener on a loopback port with a real local spool in
//! a temporary directory, and a raw TCP client that reads whole SMTP replies.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailroom_config::ListenerSpec;
use mailroom_inbound::{InboundDeps, Listener, Shutdown};
use mailroom_queue::local::{LocalOptions, LocalQueue};
use mailroom_queue::{Queue, StoredMessage};
use mailroom_telemetry::DeliveryLog;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running listener.
pub struct TestServer {
    pub addr: SocketAddr,
    pub queue: Arc<LocalQueue>,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<()>,
    pub dir: tempfile::TempDir,
}

/// A listener spec for tests: accepts mail for example.test on 127.0.0.1:0.
pub fn spec() -> ListenerSpec {
    let mut s = ListenerSpec::new("test", "127.0.0.1:0");
    s.accepted_domains = vec!["example.test".into()];
    s.hostname = Some("mx.test".into());
    s
}

/// Plugin specs from the YAML of a `plugins:` list (indented two spaces), read through the real
/// config loader so that tests use exactly what a config file would give.
pub fn plugins(list_yaml: &str) -> Vec<mailroom_config::PluginSpec> {
    let doc = format!(
        "listeners:\n- name: x\n  address: 127.0.0.1:0\n  acceptedDomains: [example.test]\n  plugins:\n{list_yaml}"
    );
    let mut config =
        mailroom_config::load_str(&doc, "inline plugins").expect("valid plugin config");
    config.listeners.remove(0).plugins
}

/// Binds `spec` with `queue` behind it and runs the listener; returns its address, its
/// shutdown handle and its task.
pub async fn serve(
    spec: ListenerSpec,
    queue: Arc<dyn Queue>,
) -> (SocketAddr, Shutdown, tokio::task::JoinHandle<()>) {
    let deps = InboundDeps {
        queue,
        delivery_log: DeliveryLog::discard(),
        hostname: "mx.test".into(),
        shared: None,
    };
    let listener = Listener::bind(&spec, "listeners[0]", &deps)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = Shutdown::default();
    let task = tokio::spawn(listener.run(shutdown.clone()));
    (addr, shutdown, task)
}

impl TestServer {
    pub async fn start(spec: ListenerSpec) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Arc::new(
            LocalQueue::open(
                dir.path().join("spool"),
                LocalOptions {
                    max_batch: 64,
                    ..LocalOptions::default()
                },
            )
            .await
            .expect("open spool"),
        );
        let (addr, shutdown, task) = serve(spec, Arc::clone(&queue) as Arc<dyn Queue>).await;
        TestServer {
            addr,
            queue,
            shutdown,
            task,
            dir,
        }
    }

    pub async fn connect(&self) -> Client<TcpStream> {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        Client::new(stream)
    }

    /// Connects and reads the banner.
    pub async fn session(&self) -> Client<TcpStream> {
        let mut c = self.connect().await;
        c.expect("220 mx.test").await;
        c
    }

    /// Reads the `250 ... queued as ID` reply on `c` and returns the stored message.
    pub async fn stored_after<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        c: &mut Client<S>,
    ) -> StoredMessage {
        let r = c.expect("250 2.0.0 Ok: queued as ").await;
        let id = r
            .trim_start_matches("250 2.0.0 Ok: queued as ")
            .parse()
            .expect("queue id in the reply");
        self.queue
            .get(id)
            .await
            .expect("get")
            .expect("the message is stored")
    }

    pub async fn queued(&self) -> u64 {
        self.queue.stats().await.expect("stats").messages
    }
}

/// A raw SMTP client.
pub struct Client<S> {
    pub stream: S,
    buf: Vec<u8>,
}

pub const WAIT: Duration = Duration::from_secs(10);

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Self {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// Sends a command line (CRLF added).
    pub async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes()).await;
    }

    /// Reads one whole reply (all lines of a multi-line reply), or None at EOF.
    pub async fn reply(&mut self) -> Option<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            let last = line.len() < 4 || line.as_bytes()[3] != b'-';
            lines.push(line);
            if last {
                return Some(lines.join("\n"));
            }
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("reply timed out")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads a reply and asserts it starts with `prefix`; returns it.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let r = self
            .reply()
            .await
            .unwrap_or_else(|| panic!("connection closed, expected {prefix:?}"));
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    /// Sends a command and checks its reply.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.line(line).await;
        self.expect(prefix).await
    }

    /// True when the server closes the connection (EOF) before `WAIT`.
    pub async fn closed(&mut self) -> bool {
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// EHLO, MAIL, RCPT, DATA; returns after the 354.
    pub async fn start_data(&mut self, rcpt: &str) {
        self.line("EHLO client.test").await;
        self.expect("250").await;
        self.cmd("MAIL FROM:<sender@client.test>", "250 2.1.0")
            .await;
        self.cmd(&format!("RCPT TO:<{rcpt}>"), "250 2.1.5").await;
        self.cmd("DATA", "354").await;
    }

    /// Sends a whole message and returns the queue id from the 250 reply.
    pub async fn send_message(&mut self, rcpt: &str, body: &[u8]) -> String {
        self.start_data(rcpt).await;
        self.send(body).await;
        self.send(b".\r\n").await;
        let r = self.expect("250 2.0.0 Ok: queued as ").await;
        r.trim_start_matches("250 2.0.0 Ok: queued as ").to_string()
    }
}
