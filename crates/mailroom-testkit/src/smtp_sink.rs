//! [`SmtpSink`]: a minimal SMTP server for tests that accepts every message and records it, on
//! a runtime of its own thread (works from `#[test]` and `#[tokio::test]` alike). It can be
//! slowed down: a delay before the `250` that ends DATA, changeable while it runs (a running
//! delay ends early when the delay is lowered), which makes a queue in front of it grow.
//!
//! ```no_run
//! # fn main() -> Result<(), mailroom_testkit::TestkitError> {
//! use std::time::Duration;
//! let sink = mailroom_testkit::SmtpSink::start()?;
//! sink.set_delay(Duration::from_secs(2));
//! // ... deliver mail to sink.addr() ...
//! let counts = sink.message_id_counts(); // Message-ID -> times delivered
//! # let _ = counts;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::error::{Result, TestkitError};

/// Longest accepted message (bytes).
const MAX_MESSAGE: usize = 50 * 1024 * 1024;
/// An idle connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One message the sink accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// The `MAIL FROM` address (without `<>`, empty for the null sender).
    pub mail_from: String,
    /// The `RCPT TO` addresses.
    pub rcpt_to: Vec<String>,
    /// The message as received (dot-unstuffed, CRLF line ends, without the final `.`).
    pub data: Vec<u8>,
    /// Value of its `Message-ID:` header, if any (with the angle brackets).
    pub message_id: Option<String>,
    /// The client's address.
    pub peer: SocketAddr,
}

#[derive(Debug, Default)]
struct State {
    messages: Mutex<Vec<SinkMessage>>,
    delay_ms: AtomicU64,
    connections: AtomicU64,
}

/// A running SMTP sink; stopped on drop.
pub struct SmtpSink {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .field("messages", &self.count())
            .finish_non_exhaustive()
    }
}

impl SmtpSink {
    /// Starts on a free port of 127.0.0.1.
    ///
    /// # Errors
    /// The port cannot be bound or the thread not started.
    pub fn start() -> Result<Self> {
        Self::start_on(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
    }

    /// Starts on `addr` (port 0: a free one), e.g. a [`crate::PodNetwork`] gateway so that pods
    /// reach it.
    ///
    /// # Errors
    /// The address cannot be bound or the thread not started.
    pub fn start_on(addr: SocketAddr) -> Result<Self> {
        let io_err = |source| TestkitError::Io {
            what: "cannot start the SMTP sink on",
            path: PathBuf::from(addr.to_string()),
            source,
        };
        let listener = std::net::TcpListener::bind(addr).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let addr = listener.local_addr().map_err(io_err)?;
        let state = Arc::new(State::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_state = Arc::clone(&state);
        let thread = thread::Builder::new()
            .name(format!("testkit-smtp-sink-{}", addr.port()))
            .spawn(move || serve(listener, thread_state, &ready_tx, stop_rx))
            .map_err(io_err)?;
        let mut sink = Self {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(sink),
            Ok(Err(e)) => {
                sink.shutdown();
                Err(io_err(e))
            }
            Err(_) => {
                sink.shutdown();
                Err(io_err(io::Error::other(
                    "the sink thread exited during startup",
                )))
            }
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delay before the reply to each message's end of DATA (0 by default). Takes effect at
    /// once, also for messages waiting now.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.state
            .messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many messages were accepted.
    pub fn count(&self) -> usize {
        self.state
            .messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How often each Message-ID was accepted (messages without one count under `""`).
    pub fn message_id_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for m in self.messages() {
            *counts.entry(m.message_id.unwrap_or_default()).or_insert(0) += 1;
        }
        counts
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    ready: &mpsc::Sender<io::Result<()>>,
    mut stop: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => {
                    if let Ok((stream, peer)) = accepted {
                        state.connections.fetch_add(1, Ordering::Relaxed);
                        let state = Arc::clone(&state);
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(3600),
                                session(stream, peer, state),
                            )
                            .await;
                        });
                    }
                }
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// `<addr>` or `<addr> PARAM=...` after `MAIL FROM:` / `RCPT TO:`.
fn path_of(arg: &str) -> String {
    let arg = arg.trim();
    match (arg.find('<'), arg.find('>')) {
        (Some(a), Some(b)) if a < b => arg[a + 1..b].to_owned(),
        _ => arg.split_whitespace().next().unwrap_or_default().to_owned(),
    }
}

/// The `Message-ID:` header of a message (first one, unfolded, trimmed).
fn message_id(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("message-id")
        {
            let mut value = value.trim().to_owned();
            while let Some(next) = lines.peek() {
                if next.starts_with(' ') || next.starts_with('\t') {
                    value.push_str(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            return Some(value);
        }
    }
    None
}

async fn session(stream: TcpStream, peer: SocketAddr, state: Arc<State>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write
        .write_all(b"220 sink.test ESMTP mailroom-testkit\r\n")
        .await?;
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(IDLE_TIMEOUT, reader.read_until(b'\n', &mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle"))??;
        if n == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let upper = text.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 52428800\r\n"
        } else if upper.starts_with("HELO") {
            b"250 sink.test\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(path_of(&text[10..]));
            rcpts.clear();
            b"250 2.1.0 Ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                b"503 5.5.1 MAIL first\r\n"
            } else {
                rcpts.push(path_of(&text[8..]));
                b"250 2.1.5 Ok\r\n"
            }
        } else if upper == "DATA" {
            if from.is_none() || rcpts.is_empty() {
                b"503 5.5.1 RCPT first\r\n"
            } else {
                write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let data = read_data(&mut reader).await?;
                let started = Instant::now();
                // Honour the delay as it is now, also when it is lowered meanwhile.
                loop {
                    let delay = Duration::from_millis(state.delay_ms.load(Ordering::Relaxed));
                    if started.elapsed() >= delay {
                        break;
                    }
                    let left = delay - started.elapsed();
                    tokio::time::sleep(left.min(Duration::from_millis(50))).await;
                }
                let Some(data) = data else {
                    write.write_all(b"552 5.3.4 Message too big\r\n").await?;
                    from = None;
                    rcpts.clear();
                    continue;
                };
                let message = SinkMessage {
                    mail_from: from.take().unwrap_or_default(),
                    rcpt_to: std::mem::take(&mut rcpts),
                    message_id: message_id(&data),
                    data,
                    peer,
                };
                state
                    .messages
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(message);
                b"250 2.0.0 Ok: queued\r\n"
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            b"250 2.0.0 Ok\r\n"
        } else if upper.starts_with("NOOP") {
            b"250 2.0.0 Ok\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 Command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// Reads DATA lines up to `.`; `None` if the message is larger than [`MAX_MESSAGE`] (read and
/// discarded).
async fn read_data<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut too_big = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in DATA"));
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(if too_big { None } else { Some(data) });
        }
        let content = if line.first() == Some(&b'.') {
            &line[1..]
        } else {
            &line[..]
        };
        if data.len() + content.len() > MAX_MESSAGE {
            too_big = true;
            data.clear();
        } else if !too_big {
            data.extend_from_slice(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader as StdBufReader, Write};

    fn expect(reader: &mut impl BufRead, code: &str) {
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            assert!(line.starts_with(code), "expected {code}, got {line:?}");
            if line.as_bytes().get(3) != Some(&b'-') {
                return;
            }
        }
    }

    #[test]
    fn records_messages_and_counts_message_ids() {
        let sink = SmtpSink::start().expect("sink");
        sink.set_delay(Duration::from_millis(200));
        let stream = std::net::TcpStream::connect(sink.addr()).expect("connect");
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = StdBufReader::new(stream);
        expect(&mut reader, "220");
        for (cmd, code) in [
            ("EHLO me\r\n", "250"),
            ("MAIL FROM:<a@x.test> BODY=8BITMIME\r\n", "250"),
            ("RCPT TO:<b@y.test>\r\n", "250"),
            ("DATA\r\n", "354"),
        ] {
            writer.write_all(cmd.as_bytes()).expect("write");
            expect(&mut reader, code);
        }
        let started = Instant::now();
        writer
            .write_all(b"Message-ID: <1@x.test>\r\nSubject: s\r\n\r\n..dot\r\n.\r\n")
            .expect("write");
        expect(&mut reader, "250");
        assert!(started.elapsed() >= Duration::from_millis(200));
        writer.write_all(b"QUIT\r\n").expect("write");
        expect(&mut reader, "221");
        let messages = sink.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].mail_from, "a@x.test");
        assert_eq!(messages[0].rcpt_to, ["b@y.test"]);
        assert!(messages[0].data.ends_with(b"\r\n.dot\r\n"));
        assert_eq!(sink.message_id_counts().get("<1@x.test>"), Some(&1));
    }
}
