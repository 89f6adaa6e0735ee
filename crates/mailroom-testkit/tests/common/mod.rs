//! A minimal raw NATS protocol client over std TcpStream, enough to check INFO, auth and to
//! make JetStream API requests without a NATS client crate.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RawNats {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub info: String,
    next_sid: u64,
}

impl RawNats {
    /// Connects and reads the server's `INFO {...}` line.
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
            info: String::new(),
            next_sid: 1,
        };
        client.info = client.read_line()?;
        Ok(client)
    }

    pub fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(line.trim_end().to_owned())
    }

    pub fn send(&mut self, raw: &str) -> std::io::Result<()> {
        self.writer.write_all(raw.as_bytes())
    }

    /// Sends CONNECT with these extra JSON fields, then PING; returns the first line that is
    /// not a PING (`PONG` on success, `-ERR ...` on failure).
    pub fn handshake(&mut self, extra_fields: &str) -> std::io::Result<String> {
        let sep = if extra_fields.is_empty() { "" } else { "," };
        self.send(&format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false{sep}{extra_fields}}}\r\nPING\r\n"
        ))?;
        loop {
            let line = self.read_line()?;
            if line == "PING" {
                self.send("PONG\r\n")?;
                continue;
            }
            return Ok(line);
        }
    }

    /// Request/reply: SUB an inbox, PUB with that reply subject, return the first reply body.
    pub fn request(&mut self, subject: &str, payload: &str) -> std::io::Result<String> {
        let sid = self.next_sid;
        self.next_sid += 1;
        let inbox = format!("_INBOX.testkit.{sid}");
        self.send(&format!(
            "SUB {inbox} {sid}\r\nPUB {subject} {inbox} {}\r\n{payload}\r\n",
            payload.len()
        ))?;
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply to {subject}"),
                ));
            }
            let line = self.read_line()?;
            if line == "PING" {
                self.send("PONG\r\n")?;
                continue;
            }
            if line.starts_with("-ERR") {
                return Err(std::io::Error::other(line));
            }
            // MSG <subject> <sid> [reply] <bytes>
            if let Some(rest) = line.strip_prefix("MSG ") {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let len: usize = fields
                    .last()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("bad MSG line {line:?}")))?;
                let mut body = vec![0; len + 2];
                self.reader.read_exact(&mut body)?;
                body.truncate(len);
                self.send(&format!("UNSUB {sid}\r\n"))?;
                return Ok(String::from_utf8_lossy(&body).into_owned());
            }
        }
    }
}

/// JetStream API request with retries (a clustered stream may be briefly without a leader).
pub fn js_request_until_ok(
    port: u16,
    subject: &str,
    payload: &str,
    budget: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + budget;
    let mut last = String::new();
    while Instant::now() < deadline {
        match RawNats::connect(port).and_then(|mut c| {
            c.handshake("")?;
            c.request(subject, payload)
        }) {
            Ok(reply) if !reply.contains("\"error\"") => return Ok(reply),
            Ok(reply) => last = reply,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("{subject}: {last}"))
}
