//! The byte layer under a session: a read buffer that is released while the client is idle
//! (an idle connection must cost little memory), a write buffer that collects pipelined replies
//! (RFC 2920: flushed before we wait for more input), and [`Prefixed`], a stream that first
//! replays bytes read ahead (after a PROXY header) before reading the socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use mailroom_smtp::Reply;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Read size while reading commands: commands are short and an idle buffer should be small.
pub const COMMAND_READ: usize = 1024;
/// Read size while receiving message data.
pub const DATA_READ: usize = 64 * 1024;

/// A stream a session can run on. `poll_idle_ready` lets an idle session wait for input
/// without holding a read buffer: plaintext TCP waits for readability with no memory at all;
/// other streams (TLS, test pipes) report ready at once and read into a small buffer.
pub trait SmtpStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Ready when a read would likely make progress.
    fn poll_idle_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl SmtpStream for Prefixed<tokio::net::TcpStream> {
    fn poll_idle_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> SmtpStream for tokio_rustls::server::TlsStream<S> {}
impl SmtpStream for tokio::io::DuplexStream {}
impl SmtpStream for tokio::net::TcpStream {
    fn poll_idle_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

/// A stream that yields `prefix` before the inner stream's bytes.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`; `prefix` is read first.
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            if self.prefix.is_empty() {
                self.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A stream with SMTP's buffers.
#[derive(Debug)]
pub struct Conn<S> {
    pub stream: S,
    pub rbuf: BytesMut,
    wbuf: Vec<u8>,
}

impl<S: SmtpStream> Conn<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
        }
    }

    /// Queues a reply; it is sent by the next [`flush`](Self::flush).
    pub fn push(&mut self, reply: &Reply) {
        reply.write_to(&mut self.wbuf);
    }

    /// Whether replies wait to be sent.
    pub fn has_output(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// Sends queued replies.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        self.wbuf.clear();
        if self.wbuf.capacity() > 4096 {
            self.wbuf = Vec::new();
        }
        Ok(())
    }

    /// Reads more input, at most `chunk` bytes. Returns 0 at end of stream. When the buffer is
    /// empty its memory is given back and the wait for input happens without a buffer, so an
    /// idle plaintext session holds no read buffer at all.
    pub async fn fill(&mut self, chunk: usize) -> io::Result<usize> {
        if self.rbuf.is_empty() {
            if self.rbuf.capacity() > 0 {
                self.rbuf = BytesMut::new();
            }
            std::future::poll_fn(|cx| self.stream.poll_idle_ready(cx)).await?;
        }
        self.rbuf.reserve(chunk);
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// Gives up the stream, dropping any buffered input (STARTTLS: RFC 3207 §4.2 / CVE-2011-0411).
    pub fn into_stream(self) -> S {
        self.stream
    }
}
