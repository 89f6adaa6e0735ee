//! The message as it goes after DATA (RFC 5321 §4.1.1.4, §4.5.2), without I/O.
//!
//! - Line endings: RFC 5321 §2.3.8 allows only CRLF. A bare LF, and a bare CR, are sent as
//!   CRLF, so every line the receiver sees is a line we meant (a body with `\n.\r\n` can
//!   then never end the data early: SMTP smuggling, CVE-2023-51764, needs a receiver and a
//!   sender that disagree about line ends). Queued messages are CRLF already; this matters
//!   for messages from elsewhere.
//! - Dot-stuffing: a line starting with `.` gets another `.` (§4.5.2).
//! - The end: a CRLF is added when the last line has none, then `.` CRLF.
//!
//! Lines longer than 998 octets are sent as they are (no folding).

/// Streams a body into its DATA form, chunk by chunk.
#[derive(Debug, Clone)]
pub(crate) struct DotStuffer {
    at_line_start: bool,
    after_cr: bool,
}

impl DotStuffer {
    pub(crate) fn new() -> DotStuffer {
        DotStuffer {
            at_line_start: true,
            after_cr: false,
        }
    }

    /// Appends the encoded form of `input` to `out`.
    pub(crate) fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 2);
        let mut rest = input;
        while let Some((&b, tail)) = rest.split_first() {
            match b {
                b'\r' => {
                    out.extend_from_slice(b"\r\n");
                    self.after_cr = true;
                    self.at_line_start = true;
                    rest = tail;
                }
                b'\n' => {
                    if !self.after_cr {
                        out.extend_from_slice(b"\r\n");
                    }
                    self.after_cr = false;
                    self.at_line_start = true;
                    rest = tail;
                }
                _ => {
                    if self.at_line_start && b == b'.' {
                        out.push(b'.');
                    }
                    // Copy the run up to the next line ending in one go.
                    let run = rest
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(rest.len());
                    let (text, tail) = rest.split_at(run);
                    out.extend_from_slice(text);
                    self.after_cr = false;
                    self.at_line_start = false;
                    rest = tail;
                }
            }
        }
    }

    /// Ends the data: CRLF if the last line was not terminated, then `.` CRLF.
    pub(crate) fn finish(self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The size of `body` as the server will store it: line endings as CRLF and a final CRLF,
/// without the dot-stuffing (RFC 1870 §3: the SIZE value counts CRLF pairs, not the
/// transparency dots).
pub(crate) fn normalized_len(body: &[u8]) -> u64 {
    let mut len: u64 = 0;
    let mut after_cr = false;
    let mut at_line_start = true;
    for &b in body {
        match b {
            b'\r' => {
                len += 2;
                after_cr = true;
                at_line_start = true;
            }
            b'\n' => {
                if !after_cr {
                    len += 2;
                }
                after_cr = false;
                at_line_start = true;
            }
            _ => {
                len += 1;
                after_cr = false;
                at_line_start = false;
            }
        }
    }
    if !at_line_start {
        len += 2;
    }
    len
}

/// True when the header section (up to the first empty line) is ASCII: then a message
/// flagged SMTPUTF8 with ASCII addresses does not really need the extension (like Postfix's
/// `smtputf8_autodetect`), and can go to a server without it.
pub(crate) fn header_is_ascii(body: &[u8]) -> bool {
    let mut line_start = 0;
    for (i, &b) in body.iter().enumerate() {
        if b == b'\n' {
            let line = &body[line_start..i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                return true;
            }
            line_start = i + 1;
        } else if !b.is_ascii() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(chunks: &[&[u8]]) -> Vec<u8> {
        let mut enc = DotStuffer::new();
        let mut out = Vec::new();
        for c in chunks {
            enc.encode(c, &mut out);
        }
        enc.finish(&mut out);
        out
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".a\r\n", b"..a\r\n.\r\n"),
            (b"..\r\n", b"...\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\rb", b"a\r\nb\r\n.\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
            (b"a.b\r\n x.\r\n", b"a.b\r\n x.\r\n.\r\n"),
            (b"\n.\r\n", b"\r\n..\r\n.\r\n"),
            (b"a\r\n\r\n", b"a\r\n\r\n.\r\n"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                String::from_utf8_lossy(&encode(&[input])),
                String::from_utf8_lossy(expected),
                "{}",
                String::from_utf8_lossy(input)
            );
            // Same result when the input arrives one byte at a time.
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(encode(&bytes), *expected);
            // SIZE counts the stored form: no stuffing dots, no terminator.
            let stuffed = expected.len() - 3;
            let unstuffed = expected[..stuffed]
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(b".."))
                .count();
            assert_eq!(
                normalized_len(input),
                (stuffed - unstuffed) as u64,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn split_crlf_across_chunks() {
        assert_eq!(encode(&[b"a\r", b"\n.b\r", b"\n"]), b"a\r\n..b\r\n.\r\n");
    }

    #[test]
    fn header_detection() {
        assert!(header_is_ascii(
            b"Subject: hi\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n"
        ));
        assert!(!header_is_ascii(
            b"Subject: d\xc3\xa9j\xc3\xa0\r\n\r\nbody\r\n"
        ));
        assert!(header_is_ascii(b"Subject: hi\n\nd\xc3\xa9j\xc3\xa0\n"));
        assert!(header_is_ascii(b""));
    }
}
