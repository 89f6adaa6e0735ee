//! Loopback helpers: free port reservation and a tiny blocking HTTP/1.0 GET (plain, or HTTPS
//! with rustls) for monitoring and readiness endpoints (no HTTP client dependency).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::error::{Result, TestkitError};

/// Ports this process has handed out already. The OS may give the same ephemeral port to two
/// `bind(:0)` calls once the first listener is closed; remembering them keeps two servers of the
/// same test binary from ever being given the same port. Collisions with other processes are
/// handled by the callers (retry with new ports when a server reports "address already in use").
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Reserves `n` distinct free ports on 127.0.0.1 (bind to port 0, read the port, close).
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let used = guard.get_or_insert_with(HashSet::new);
    // Keep every listener open until all n ports are chosen so they are distinct.
    let mut listeners = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut attempts = 0;
    while ports.len() < n {
        attempts += 1;
        if attempts > 64 * n.max(1) {
            return Err(TestkitError::FreePort {
                source: io::Error::new(io::ErrorKind::AddrInUse, "too many attempts"),
            });
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|source| TestkitError::FreePort { source })?;
        let port = listener
            .local_addr()
            .map_err(|source| TestkitError::FreePort { source })?
            .port();
        if used.insert(port) {
            ports.push(port);
        }
        listeners.push(listener);
    }
    drop(listeners);
    Ok(ports)
}

/// Status and body of an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) body: String,
}

const MAX_RESPONSE: u64 = 8 * 1024 * 1024;

/// `GET http://127.0.0.1:<port><path>` over a plain TcpStream, HTTP/1.0 so the server closes the
/// connection and never uses chunked encoding.
pub(crate) fn http_get(port: u16, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let err = |reason: String| TestkitError::Http {
        port,
        path: path.to_owned(),
        reason,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| err(format!("connect: {e}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| err(format!("set timeout: {e}")))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| err(format!("send: {e}")))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(|e| err(format!("read: {e}")))?;
    parse_response(&raw).map_err(err)
}

/// `GET https://127.0.0.1:<port><path>` (HTTP/1.0, no ALPN) with the given rustls config (roots,
/// client cert). The error is a one-line reason, for readiness probes.
pub(crate) fn https_get(
    port: u16,
    path: &str,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> std::result::Result<HttpResponse, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("set timeout: {e}"))?;
    let server_name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let conn = rustls::ClientConnection::new(Arc::clone(tls), server_name)
        .map_err(|e| format!("TLS setup: {e}"))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.flush())
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    match (&mut stream).take(MAX_RESPONSE).read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify: the response is complete anyway
        // (HTTP/1.0, the server closes after it).
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    parse_response(&raw)
}

/// Splits a raw HTTP/1.x response into status and body.
fn parse_response(raw: &[u8]) -> std::result::Result<HttpResponse, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "response has no header end".to_owned())?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::thread;

    #[test]
    fn free_ports_are_distinct_and_never_reused_in_process() {
        let a = free_ports(5).expect("ports");
        let b = free_ports(5).expect("ports");
        let all: HashSet<u16> = a.iter().chain(b.iter()).copied().collect();
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|p| *p != 0));
    }

    #[test]
    fn http_get_parses_status_and_body() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let mut request_line = String::new();
            reader.read_line(&mut request_line).expect("read");
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("read");
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{\"status\":\"unavailable\"}")
                .expect("write");
            request_line
        });
        let resp = http_get(
            port,
            "/healthz?js-enabled-only=true",
            Duration::from_secs(5),
        )
        .expect("get");
        assert_eq!(resp.status, 503);
        assert_eq!(resp.body, "{\"status\":\"unavailable\"}");
        let request_line = server.join().expect("join");
        assert_eq!(
            request_line,
            "GET /healthz?js-enabled-only=true HTTP/1.0\r\n"
        );
    }

    #[test]
    fn http_get_to_closed_port_fails_with_port_in_message() {
        let port = free_ports(1).expect("port")[0];
        let err = http_get(port, "/varz", Duration::from_millis(500)).expect_err("closed");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}/varz")));
    }
}
