//! Command lines off the wire: CRLF-terminated, bounded in length.
//!
//! The server's read loop appends socket reads to a `BytesMut` and calls
//! [`LineReader::read_line`] until it returns `None`; each complete line goes to
//! `command::parse_command`. An overlong line is discarded as it arrives, so a client that never
//! sends a line ending cannot make the buffer grow past `max_len` (RFC 5321 §4.5.3.1.4 allows
//! 512 octets; extensions such as AUTH may need more, RFC 4954 §4).

use bytes::{Buf, Bytes, BytesMut};

/// Maximum command line length including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;

/// Why a line was refused. In both cases the offending line has been consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line was longer than the limit (RFC 5321 §4.5.3.1.4; reply `500 5.5.2 Line too long`,
    /// §4.5.3.1.9).
    #[error("line too long")]
    TooLong,
    /// The line ended in LF without a CR before it (RFC 5321 §2.3.8 allows only CRLF).
    #[error("line terminated by bare LF")]
    BareLf,
}

/// Splits CRLF-terminated lines off a buffer without ever holding more than `max_len` octets of
/// one line.
#[derive(Debug)]
pub struct LineReader {
    max_len: usize,
    discarding: bool,
}

impl LineReader {
    /// A reader for lines of at most `max_len` octets including CRLF (RFC 5321 §4.5.3.1.4: 512).
    /// Values below 2 are raised to 2 (an empty line).
    pub fn new(max_len: usize) -> Self {
        LineReader {
            max_len: max_len.max(2),
            discarding: false,
        }
    }

    /// Takes one complete line (without its CRLF) off the front of `buf`. Returns `None` when
    /// more input is needed. When the buffer holds `max_len` bytes without CRLF, it discards
    /// them immediately (so memory stays bounded) and keeps discarding until the next LF; it then
    /// returns `Some(Err(LineError::TooLong))`. A line terminated by a bare LF (no CR before it)
    /// returns `Some(Err(LineError::BareLf))`, the line consumed. A bare CR inside a line is
    /// passed through: the command parser refuses it as a control character.
    pub fn read_line(&mut self, buf: &mut BytesMut) -> Option<Result<Bytes, LineError>> {
        if self.discarding {
            return match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    buf.advance(i + 1);
                    self.discarding = false;
                    Some(Err(LineError::TooLong))
                }
                None => {
                    buf.clear();
                    None
                }
            };
        }
        let window = &buf[..buf.len().min(self.max_len)];
        match memchr::memchr(b'\n', window) {
            Some(i) => {
                let mut line = buf.split_to(i + 1).freeze();
                line.truncate(i);
                if line.last() == Some(&b'\r') {
                    line.truncate(i - 1);
                    Some(Ok(line))
                } else {
                    Some(Err(LineError::BareLf))
                }
            }
            None if buf.len() >= self.max_len => {
                buf.advance(self.max_len);
                self.discarding = true;
                self.read_line(buf)
            }
            None => None,
        }
    }

    /// True while the reader is discarding the rest of an overlong line.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// The limit in octets, CRLF included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max_len: usize, chunk: usize) -> Vec<Result<Bytes, LineError>> {
        let mut reader = LineReader::new(max_len);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(r) = reader.read_line(&mut buf) {
                out.push(r);
            }
            assert!(buf.len() < max_len, "buffer bounded");
        }
        out
    }

    #[test]
    fn table() {
        let ok = |s: &'static str| Ok(Bytes::from_static(s.as_bytes()));
        type Case = (&'static [u8], usize, Vec<Result<Bytes, LineError>>);
        let cases: &[Case] = &[
            (b"EHLO x\r\n", 512, vec![ok("EHLO x")]),
            (b"a\r\nb\r\n\r\nc", 512, vec![ok("a"), ok("b"), ok("")]),
            (b"a\nb\r\n", 512, vec![Err(LineError::BareLf), ok("b")]),
            (b"a\rb\r\n", 512, vec![ok("a\rb")]),
            (b"\n", 512, vec![Err(LineError::BareLf)]),
            // exactly max_len including CRLF is fine, one more is too long
            (b"12345678\r\n", 10, vec![ok("12345678")]),
            (
                b"123456789\r\nok\r\n",
                10,
                vec![Err(LineError::TooLong), ok("ok")],
            ),
            (
                b"1234567890123\nok\r\n",
                10,
                vec![Err(LineError::TooLong), ok("ok")],
            ),
        ];
        for (input, max, expected) in cases {
            for chunk in [1, 2, 3, 7, 100] {
                assert_eq!(
                    &lines(input, *max, chunk),
                    expected,
                    "{:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn megabyte_line_is_bounded() {
        let mut reader = LineReader::new(MAX_COMMAND_LINE);
        let mut buf = BytesMut::new();
        let piece = vec![b'A'; 4096];
        let mut results = Vec::new();
        for _ in 0..256 {
            buf.extend_from_slice(&piece);
            while let Some(r) = reader.read_line(&mut buf) {
                results.push(r);
            }
            assert!(buf.len() <= MAX_COMMAND_LINE);
        }
        assert!(results.is_empty());
        assert!(reader.is_discarding());
        buf.extend_from_slice(b"AAAA\r\nQUIT\r\n");
        while let Some(r) = reader.read_line(&mut buf) {
            results.push(r);
        }
        assert_eq!(
            results,
            vec![Err(LineError::TooLong), Ok(Bytes::from_static(b"QUIT"))]
        );
        assert!(buf.is_empty());
    }
}
