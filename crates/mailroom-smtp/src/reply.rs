//! SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463).
//!
//! The server builds a [`Reply`] for every command (plugins build them for their verdicts) and
//! writes it with [`Reply::write_to`]; the outbound client reads the peer's replies with
//! [`ReplyParser`], which reassembles multi-line replies and extracts the enhanced code.

use std::fmt;

use bytes::{Buf, BytesMut};

/// Maximum number of lines of one reply accepted by [`ReplyParser`]; bounds memory against a
/// peer that never sends the last line (an EHLO reply has a few dozen at most).
pub const MAX_REPLY_LINES: usize = 256;

/// An enhanced mail system status code `class.subject.detail` (RFC 3463 §2), e.g. `5.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply: a three-digit code, an optional enhanced code and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reply {
    /// The reply code, 200..=599 (RFC 5321 §4.2.1).
    pub code: u16,
    /// The enhanced status code, written after the code on every line (RFC 2034 §4).
    pub enhanced: Option<EnhancedCode>,
    /// The text lines, without code, enhanced code or CRLF.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with an enhanced code. `text` may contain `\n` to make a multi-line reply; a
    /// `\r` before it is dropped.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: split_lines(&text.into()),
        }
    }

    /// A reply without an enhanced code: RFC 2034 §3 excludes the greeting and the replies to
    /// HELO/EHLO; `354` and `334` do not carry one either.
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines: split_lines(&text.into()),
        }
    }

    /// Appends the wire form to `out`: `250-a\r\n250 b\r\n`, the enhanced code after the code
    /// on every line (RFC 2034 §4), CR and LF removed from the text so that a reply can never
    /// inject another line. A reply without lines is written as one line without text.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = self.code.min(999);
        let last = self.lines.len().saturating_sub(1);
        let empty = [String::new()];
        let lines: &[String] = if self.lines.is_empty() {
            &empty
        } else {
            &self.lines
        };
        for (i, line) in lines.iter().enumerate() {
            let text = line.bytes().filter(|&b| b != b'\r' && b != b'\n');
            let has_text = line.bytes().any(|b| b != b'\r' && b != b'\n');
            out.extend_from_slice(format!("{code:03}").as_bytes());
            if i != last {
                out.push(b'-');
            } else if self.enhanced.is_some() || has_text {
                out.push(b' ');
            }
            if let Some(enhanced) = self.enhanced {
                out.extend_from_slice(enhanced.to_string().as_bytes());
                if has_text {
                    out.push(b' ');
                }
            }
            out.extend(text);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// True for positive replies, 2xx and 3xx (RFC 5321 §4.2.1).
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// True for transient negative replies, 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// True for permanent negative replies, 5xx.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

impl fmt::Display for Reply {
    /// The wire form, CRLFs included (lossy for non-UTF-8, which `write_to` never produces).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

fn split_lines(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
        .collect()
}

/// Why a reply from a peer could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line longer than the parser's limit (RFC 5321 §4.5.3.1.5: 512 octets).
    #[error("reply line too long")]
    TooLong,
    /// A line that does not start with a three-digit code followed by SP, `-` or the end.
    #[error("malformed reply line")]
    Malformed,
    /// The lines of a multi-line reply carry different codes (RFC 5321 §4.2.1).
    #[error("inconsistent codes in multi-line reply")]
    InconsistentCode,
    /// More than [`MAX_REPLY_LINES`] lines.
    #[error("too many lines in reply")]
    TooManyLines,
}

/// Reassembles replies read by an SMTP client. Lines may end in CRLF or, leniently, a bare LF.
#[derive(Debug)]
pub struct ReplyParser {
    max_line: usize,
    code: Option<u16>,
    lines: Vec<String>,
    discarding: bool,
}

impl ReplyParser {
    /// A parser accepting lines of at most `max_line` octets including CRLF.
    pub fn new(max_line: usize) -> Self {
        ReplyParser {
            max_line: max_line.max(1),
            code: None,
            lines: Vec::new(),
            discarding: false,
        }
    }

    /// Takes lines off the front of `buf` until a reply is complete. Returns `None` when more
    /// input is needed. After an error the parser is reset: the offending line is consumed (an
    /// overlong one is discarded up to its LF as it arrives, so memory stays bounded) and any
    /// lines collected for the current reply are dropped.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Option<Result<Reply, ReplyError>> {
        loop {
            if self.discarding {
                match memchr::memchr(b'\n', buf) {
                    Some(i) => {
                        buf.advance(i + 1);
                        self.discarding = false;
                        return Some(Err(self.fail(ReplyError::TooLong)));
                    }
                    None => {
                        buf.clear();
                        return None;
                    }
                }
            }
            let window = &buf[..buf.len().min(self.max_line)];
            let Some(i) = memchr::memchr(b'\n', window) else {
                if buf.len() >= self.max_line {
                    buf.advance(self.max_line);
                    self.discarding = true;
                    continue;
                }
                return None;
            };
            let line = buf.split_to(i + 1);
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match self.push_line(line) {
                Ok(Some(reply)) => return Some(Ok(reply)),
                Ok(None) => {}
                Err(e) => return Some(Err(self.fail(e))),
            }
        }
    }

    fn fail(&mut self, e: ReplyError) -> ReplyError {
        self.code = None;
        self.lines.clear();
        e
    }

    fn push_line(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let (digits, rest) = line.split_at_checked(3).ok_or(ReplyError::Malformed)?;
        let code = parse_code(digits).ok_or(ReplyError::Malformed)?;
        let (last, text) = match rest.split_first() {
            None => (true, &[][..]),
            Some((b' ', text)) => (true, text),
            Some((b'-', text)) => (false, text),
            Some(_) => return Err(ReplyError::Malformed),
        };
        if self.code.is_some_and(|c| c != code) {
            return Err(ReplyError::InconsistentCode);
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        self.code = Some(code);
        self.lines.push(String::from_utf8_lossy(text).into_owned());
        if !last {
            return Ok(None);
        }
        self.code = None;
        let mut lines = std::mem::take(&mut self.lines);
        let enhanced = lines
            .first()
            .and_then(|l| split_enhanced(l, code))
            .map(|(e, _)| e);
        if let Some(enhanced) = enhanced {
            for line in &mut lines {
                if let Some((e, rest)) = split_enhanced(line, code)
                    && e == enhanced
                {
                    *line = rest.to_owned();
                }
            }
        }
        Ok(Some(Reply {
            code,
            enhanced,
            lines,
        }))
    }
}

/// Three ASCII digits, the first 2..=5 (RFC 5321 §4.2: 1yz is not used by SMTP).
fn parse_code(digits: &[u8]) -> Option<u16> {
    let &[a, b, c] = digits else { return None };
    if !(b'2'..=b'5').contains(&a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return None;
    }
    Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
}

/// Splits a leading `class.subject.detail` (RFC 3463 §2: class 2, 4 or 5 matching the reply
/// code's first digit, subject and detail of 1-3 digits) followed by SP or the end of the line.
fn split_enhanced(text: &str, code: u16) -> Option<(EnhancedCode, &str)> {
    let end = text.find(' ').unwrap_or(text.len());
    let (candidate, rest) = text.split_at(end);
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let mut parts = candidate.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let number = |s: &str, max_len: usize| -> Option<u16> {
        if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let class = u8::try_from(number(class, 1)?).ok()?;
    if !matches!(class, 2 | 4 | 5) || u16::from(class) != code / 100 {
        return None;
    }
    Some((
        EnhancedCode(class, number(subject, 3)?, number(detail, 3)?),
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        let cases: &[(Reply, &str)] = &[
            (
                Reply::new(250, EnhancedCode(2, 0, 0), "Ok"),
                "250 2.0.0 Ok\r\n",
            ),
            (
                Reply::new(250, EnhancedCode(2, 1, 0), "a\nb\r\nc"),
                "250-2.1.0 a\r\n250-2.1.0 b\r\n250 2.1.0 c\r\n",
            ),
            (
                Reply::new(550, EnhancedCode(5, 7, 1), "no\rpe"),
                "550 5.7.1 nope\r\n",
            ),
            (Reply::new(421, EnhancedCode(4, 3, 2), ""), "421 4.3.2\r\n"),
            (
                Reply::plain(220, "mx.example ESMTP"),
                "220 mx.example ESMTP\r\n",
            ),
            (
                Reply::plain(250, "mx\nPIPELINING\n8BITMIME"),
                "250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            ),
            (Reply::plain(354, ""), "354\r\n"),
            (
                Reply {
                    code: 250,
                    enhanced: None,
                    lines: vec![],
                },
                "250\r\n",
            ),
            (
                Reply {
                    code: 250,
                    enhanced: None,
                    lines: vec!["x\r\n250 injected".into()],
                },
                "250 x250 injected\r\n",
            ),
        ];
        for (reply, wire) in cases {
            assert_eq!(String::from_utf8_lossy(&reply.to_bytes()), *wire);
            assert_eq!(reply.to_string(), *wire);
        }
        assert_eq!(EnhancedCode(5, 7, 1).to_string(), "5.7.1");
    }

    #[test]
    fn classes() {
        let r = |code| Reply::plain(code, "");
        assert!(r(250).is_positive() && r(354).is_positive());
        assert!(!r(450).is_positive() && r(450).is_transient());
        assert!(r(550).is_permanent() && !r(550).is_transient());
        assert_eq!(Reply::plain(250, "a\nb").text(), "a\nb");
    }

    fn parse_all(input: &[u8], max_line: usize) -> Vec<Result<Reply, ReplyError>> {
        let mut parser = ReplyParser::new(max_line);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in input {
            buf.extend_from_slice(&[b]);
            while let Some(r) = parser.parse(&mut buf) {
                out.push(r);
            }
            assert!(buf.len() <= max_line);
        }
        out
    }

    #[test]
    fn parsing() {
        type Case = (&'static [u8], Vec<Result<Reply, ReplyError>>);
        let cases: &[Case] = &[
            (
                b"250 2.0.0 Ok\r\n",
                vec![Ok(Reply::new(250, EnhancedCode(2, 0, 0), "Ok"))],
            ),
            (b"220 mx ESMTP\r\n", vec![Ok(Reply::plain(220, "mx ESMTP"))]),
            (
                b"250-mx\r\n250-SIZE 10\r\n250 8BITMIME\r\n",
                vec![Ok(Reply::plain(250, "mx\nSIZE 10\n8BITMIME"))],
            ),
            (
                b"550-5.7.1 a\r\n550 5.7.1 b\r\n",
                vec![Ok(Reply::new(550, EnhancedCode(5, 7, 1), "a\nb"))],
            ),
            (
                b"250\r\n354 go\n",
                vec![Ok(Reply::plain(250, "")), Ok(Reply::plain(354, "go"))],
            ),
            (b"451 5.0.0 x\r\n", vec![Ok(Reply::plain(451, "5.0.0 x"))]),
            (
                b"250 2.0.0\r\n",
                vec![Ok(Reply::new(250, EnhancedCode(2, 0, 0), ""))],
            ),
            (b"250 2.0 x\r\n", vec![Ok(Reply::plain(250, "2.0 x"))]),
            (
                b"250-a\r\n251 b\r\n250 c\r\n",
                vec![
                    Err(ReplyError::InconsistentCode),
                    Ok(Reply::plain(250, "c")),
                ],
            ),
            (b"25\r\n", vec![Err(ReplyError::Malformed)]),
            (b"250x\r\n", vec![Err(ReplyError::Malformed)]),
            (b"650 x\r\n", vec![Err(ReplyError::Malformed)]),
            (b"abc\r\n", vec![Err(ReplyError::Malformed)]),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &parse_all(input, 512),
                expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn parse_limits() {
        let mut input = vec![b'2', b'5', b'0', b' '];
        input.extend(std::iter::repeat_n(b'x', 10_000));
        input.extend_from_slice(b"\r\n250 ok\r\n");
        assert_eq!(
            parse_all(&input, 512),
            vec![Err(ReplyError::TooLong), Ok(Reply::plain(250, "ok"))]
        );

        let mut input = Vec::new();
        for _ in 0..=MAX_REPLY_LINES {
            input.extend_from_slice(b"250-x\r\n");
        }
        let out = parse_all(&input, 512);
        assert_eq!(out, vec![Err(ReplyError::TooManyLines)]);
    }
}
