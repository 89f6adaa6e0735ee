//! The PROXY protocol (HAProxy, versions 1 and 2) as a listener option: a load balancer in front
//! of the pods sends the real client address before the SMTP conversation starts. Without it,
//! every client would look like the balancer and the per-IP limits and access rules would be
//! useless. Parsing is done by the `ppp` crate; this module reads just enough bytes.

use std::net::SocketAddr;

use bytes::BytesMut;
use ppp::{HeaderResult, PartialResult};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest header we wait for: v1 is at most 107 octets, v2 is 16 + a 16-bit length; we refuse
/// TLVs beyond this size.
const MAX_HEADER: usize = 16 + 1024;

/// Why the PROXY header was refused; the connection is closed without a reply.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// The peer closed or the read failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// Not a PROXY header, or malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// Longer than we accept.
    #[error("PROXY header longer than {MAX_HEADER} octets")]
    TooLong,
}

/// Reads a PROXY v1 or v2 header from `stream`. Returns the client address it names (None for
/// `UNKNOWN` / `LOCAL`, meaning: use the socket's peer) and any bytes read past the header,
/// which belong to the SMTP conversation.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Option<SocketAddr>, BytesMut), ProxyError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if !buf.is_empty() {
            let parsed = HeaderResult::parse(&buf);
            if !parsed.is_incomplete() {
                let (client, len) = match parsed {
                    HeaderResult::V1(Ok(h)) => (v1_source(&h.addresses), h.header.len()),
                    HeaderResult::V2(Ok(h)) => {
                        let client = match h.command {
                            ppp::v2::Command::Local => None,
                            ppp::v2::Command::Proxy => v2_source(&h.addresses),
                        };
                        (client, h.len())
                    }
                    HeaderResult::V1(Err(e)) => {
                        return Err(ProxyError::Malformed(format!("{e:?}")));
                    }
                    HeaderResult::V2(Err(e)) => {
                        return Err(ProxyError::Malformed(format!("{e:?}")));
                    }
                };
                let rest = buf.split_off(len.min(buf.len()));
                return Ok((client, rest));
            }
        }
        if buf.len() >= MAX_HEADER {
            return Err(ProxyError::TooLong);
        }
        buf.reserve(64);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ProxyError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

fn v1_source(a: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(a: &ppp::v2::Addresses) -> Option<SocketAddr> {
    match a {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_header_gives_client_and_keeps_the_rest() {
        let mut input: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        let (client, rest) = read_proxy_header(&mut input).await.expect("valid header");
        assert_eq!(client, Some("192.0.2.7:40000".parse().expect("addr")));
        assert_eq!(&rest[..], b"EHLO x\r\n");
    }

    #[tokio::test]
    async fn v2_header_gives_client() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::1]:1234".parse::<SocketAddr>().expect("addr"),
                "[2001:db8::2]:25".parse::<SocketAddr>().expect("addr"),
            ),
        )
        .build()
        .expect("build header");
        let mut input: &[u8] = &header;
        let (client, rest) = read_proxy_header(&mut input).await.expect("valid header");
        assert_eq!(client, Some("[2001:db8::1]:1234".parse().expect("addr")));
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let mut input: &[u8] = b"EHLO not-a-proxy-header\r\n";
        assert!(read_proxy_header(&mut input).await.is_err());
    }
}
