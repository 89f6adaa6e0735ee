//! The byte level of a connection: the stream (plaintext or TLS), the read buffer and the
//! [`ReplyParser`], with every read and write under a stage's timeout. Nothing above this file
//! touches the socket.
//!
//! Memory stays bounded whatever the peer sends: reads take at most [`READ_CHUNK`] octets at
//! a time and the parser consumes complete lines, discarding an overlong line as it arrives.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use mailroom_smtp::{Reply, ReplyParser};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::error::{ClientError, ConnectFailure, Peer, ProtocolError, Stage};

/// Octets read from the socket at a time.
const READ_CHUNK: usize = 4096;

/// A plaintext or TLS stream.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens the TCP connection within `timeout`.
pub(crate) async fn tcp_connect(peer: &Peer, timeout: Duration) -> Result<TcpStream, ClientError> {
    let failure = match tokio::time::timeout(timeout, TcpStream::connect(peer.addr)).await {
        Ok(Ok(tcp)) => {
            // Commands are small and each write is followed by a read: no Nagle delay.
            let _ = tcp.set_nodelay(true);
            return Ok(tcp);
        }
        Ok(Err(e)) => ConnectFailure::from_io(e),
        Err(_) => ConnectFailure::TimedOut(timeout),
    };
    Err(ClientError::Connect {
        peer: peer.clone(),
        failure,
    })
}

/// A stream with its read side parsed into replies.
pub(crate) struct Io {
    stream: Stream,
    rbuf: BytesMut,
    parser: ReplyParser,
    max_line: usize,
    peer: Peer,
}

impl Io {
    pub(crate) fn new(stream: Stream, peer: Peer, max_line: usize) -> Io {
        Io {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            parser: ReplyParser::new(max_line),
            max_line,
            peer,
        }
    }

    pub(crate) fn peer(&self) -> &Peer {
        &self.peer
    }

    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.peer.addr
    }

    /// True when the peer sent more than it has been asked for so far.
    pub(crate) fn has_buffered_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// The TCP stream of a plaintext connection, for the TLS upgrade. The read buffer is
    /// dropped with `self`, so no plaintext survives the upgrade (RFC 3207 §4.2).
    pub(crate) fn into_tcp(self) -> Option<TcpStream> {
        match self.stream {
            Stream::Plain(tcp) => Some(tcp),
            Stream::Tls(_) => None,
        }
    }

    /// Reads one complete reply; the whole reply must arrive within `timeout`.
    pub(crate) async fn read_reply(
        &mut self,
        stage: Stage,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(parsed) = self.parser.parse(&mut self.rbuf) {
                return parsed.map_err(|e| ClientError::Protocol {
                    peer: self.peer.clone(),
                    stage,
                    error: ProtocolError::from_reply_error(e, self.max_line),
                });
            }
            let mut chunk = [0u8; READ_CHUNK];
            let read = self.stream.read(&mut chunk);
            match tokio::time::timeout_at(deadline, read).await {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        peer: self.peer.clone(),
                        stage,
                        after: timeout,
                    });
                }
                Ok(Ok(0)) => {
                    return Err(ClientError::Closed {
                        peer: self.peer.clone(),
                        stage,
                    });
                }
                Ok(Ok(n)) => self
                    .rbuf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(Err(source)) => {
                    return Err(ClientError::Io {
                        peer: self.peer.clone(),
                        stage,
                        source,
                    });
                }
            }
        }
    }

    /// Writes and flushes `bytes` within `timeout`.
    pub(crate) async fn write_all(
        &mut self,
        bytes: &[u8],
        stage: Stage,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ClientError::Io {
                peer: self.peer.clone(),
                stage,
                source,
            }),
            Err(_) => Err(ClientError::Timeout {
                peer: self.peer.clone(),
                stage,
                after: timeout,
            }),
        }
    }

    /// Sends a command line (CRLF added) and reads its reply.
    pub(crate) async fn command(
        &mut self,
        line: &str,
        stage: Stage,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.write_all(format!("{line}\r\n").as_bytes(), stage, timeout)
            .await?;
        self.read_reply(stage, timeout).await
    }

    /// Closes the write side (TLS close_notify, then FIN), ignoring errors; bounded by
    /// `timeout`.
    pub(crate) async fn shutdown(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.stream.shutdown()).await;
    }
}
