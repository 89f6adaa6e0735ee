//! Message bodies after `DATA` (RFC 5321 §4.1.1.4, §4.5.2) and `BDAT` (RFC 3030 §2).
//!
//! After the server answered `354` to DATA (or read a BDAT command line), it feeds its input
//! buffer to a [`DataReceiver`] / [`BdatReceiver`] until the body is complete, then asks
//! `finish()` for the verdict before anything is queued. The receivers are SMTP-smuggling safe:
//! only the exact `<CRLF>.<CRLF>` ends DATA, and every bare CR or LF (RFC 5321 §2.3.8) marks the
//! message as rejected, so a message that another MTA might split differently is never
//! accepted. Memory is bounded: past `max_size` the body is no longer stored, but the input is
//! still consumed up to the real end so that the session stays in sync with the client.

use bytes::{Buf, BytesMut};

use crate::reply::{EnhancedCode, Reply};

/// Maximum text line length including CRLF (RFC 5321 §4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;

/// Why a received body is refused. When several apply, [`DataReceiver::finish`] and
/// [`BdatReceiver::finish`] report them in the order of the variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DataError {
    /// The body exceeds the size limit: `552 5.3.4` (RFC 5321 §4.5.3.1.9, RFC 1870 §6.3).
    #[error("message size exceeds fixed maximum message size")]
    TooLarge,
    /// A CR not followed by LF, or an LF not preceded by CR (RFC 5321 §2.3.8): `550 5.5.2`.
    /// Refused rather than repaired, so that no hop downstream can read a different message
    /// boundary out of the same bytes (SMTP smuggling).
    #[error("message contains bare CR or LF")]
    BareLineEnding,
    /// A NUL octet: `550 5.6.0` (RFC 5321 §4.5.2 leaves it undefined; RFC 6152 §1 excludes it
    /// even from 8BITMIME).
    #[error("message contains NUL octets")]
    NulByte,
    /// A line longer than the line limit (RFC 5321 §4.5.3.1.6): `550 5.5.2`.
    #[error("message contains an overlong line")]
    LineTooLong,
}

impl DataError {
    /// The reply to the final `.` or `BDAT ... LAST`.
    ///
    /// The `LineTooLong` text states the RFC 5321 default of 1000 octets; a server configured
    /// with another limit can build its own reply with [`DataReceiver::max_line_len`].
    pub fn reply(&self) -> Reply {
        match self {
            DataError::TooLarge => Reply::new(
                552,
                EnhancedCode(5, 3, 4),
                "Message size exceeds fixed maximum message size",
            ),
            DataError::BareLineEnding => Reply::new(
                550,
                EnhancedCode(5, 5, 2),
                "Message contains bare CR or LF (RFC 5321 section 2.3.8)",
            ),
            DataError::NulByte => {
                Reply::new(550, EnhancedCode(5, 6, 0), "Message contains NUL octets")
            }
            DataError::LineTooLong => Reply::new(
                550,
                EnhancedCode(5, 5, 2),
                format!("Message contains a line longer than {MAX_TEXT_LINE} octets"),
            ),
        }
    }
}

/// The line checks shared by both receivers, over the body as stored (after dot-unstuffing).
#[derive(Debug, Clone, Default)]
struct Flags {
    bare: bool,
    nul: bool,
    long_line: bool,
    too_large: bool,
}

impl Flags {
    fn result(&self, size: u64) -> Result<u64, DataError> {
        if self.too_large {
            Err(DataError::TooLarge)
        } else if self.bare {
            Err(DataError::BareLineEnding)
        } else if self.nul {
            Err(DataError::NulByte)
        } else if self.long_line {
            Err(DataError::LineTooLong)
        } else {
            Ok(size)
        }
    }
}

/// Appends body octets to `out` while the total stays within `max_size`. Only a prefix of the
/// body is ever stored, so the stored bytes do not depend on how the input was split.
#[derive(Debug, Clone)]
struct Sink {
    max_size: u64,
    size: u64,
    max_line_len: usize,
    line_len: usize,
}

impl Sink {
    fn new(max_size: u64, max_line_len: usize) -> Self {
        Sink {
            max_size,
            size: 0,
            max_line_len,
            line_len: 0,
        }
    }

    /// Appends content octets of the current line (no line terminator among them).
    fn content(&mut self, bytes: &[u8], out: &mut Vec<u8>, flags: &mut Flags) {
        self.count(bytes.len(), flags);
        self.store(bytes, out, flags);
    }

    /// Counts `n` content octets towards the current line's length.
    fn count(&mut self, n: usize, flags: &mut Flags) {
        self.line_len = self.line_len.saturating_add(n);
        // The limit includes the CRLF (RFC 5321 §4.5.3.1.6).
        if self.line_len.saturating_add(2) > self.max_line_len {
            flags.long_line = true;
        }
    }

    /// Appends the CRLF ending a line.
    fn crlf(&mut self, out: &mut Vec<u8>, flags: &mut Flags) {
        self.line_len = 0;
        self.store(b"\r\n", out, flags);
    }

    fn store(&mut self, bytes: &[u8], out: &mut Vec<u8>, flags: &mut Flags) {
        let room = self.max_size.saturating_sub(self.size);
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if len > room {
            flags.too_large = true;
            // `room < len <= usize::MAX`, so the conversion cannot fail.
            let keep = usize::try_from(room).unwrap_or(0);
            out.extend_from_slice(&bytes[..keep]);
        } else {
            out.extend_from_slice(bytes);
        }
        self.size = self.size.saturating_add(len);
    }
}

/// Where the DATA receiver stands in the `<CRLF>.<CRLF>` grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Just after a CRLF (or at the very start: the CRLF of the DATA command counts).
    LineStart,
    /// A `.` at the start of a line, not yet known to be stuffing or the end.
    Dot,
    /// `.` CR at the start of a line: LF ends the data.
    DotCr,
    /// Inside a line.
    Text,
    /// A CR inside a line (or on an empty line), not yet stored.
    Cr,
    /// The end sequence has been consumed.
    Done,
}

/// Reads a DATA body: dot-unstuffing (RFC 5321 §4.5.2), end at `<CRLF>.<CRLF>` only, strict
/// line endings, bounded memory.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    state: State,
    sink: Sink,
    flags: Flags,
}

impl DataReceiver {
    /// A receiver for one message of at most `max_size` octets (after unstuffing, CRLFs
    /// included) and lines of at most `max_line_len` octets including CRLF (RFC 5321
    /// §4.5.3.1.6: 1000; the dot added for transparency is not counted). Pass `u64::MAX` /
    /// `usize::MAX` to disable a limit.
    pub fn new(max_size: u64, max_line_len: usize) -> Self {
        DataReceiver {
            state: State::LineStart,
            sink: Sink::new(max_size, max_line_len),
            flags: Flags::default(),
        }
    }

    /// Consumes bytes from the front of `input` (advancing it), appending the dot-unstuffed body
    /// to `out`. Returns true when the end-of-data sequence CRLF "." CRLF was consumed (input is
    /// left positioned just after it, so pipelined commands stay in `input`); false when it
    /// needs more. Once done, further calls return true without consuming anything.
    ///
    /// Only the exact sequence `<CRLF>.<CRLF>` ends the data; the initial CRLF may be the one of
    /// the DATA command, so a `.` line at the very start ends an empty message. Bare LF, bare CR
    /// (RFC 5321 §2.3.8), `\n.\n`, `\r.\r\n`, `\n.\r\n`, `\r\n.\n` and friends never end the
    /// data; they mark the message as rejected and reading continues until the real end. NUL
    /// octets mark it rejected too. Past `max_size` nothing more is appended to `out`, but the
    /// input is still scanned for the end.
    pub fn ingest(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> bool {
        let used = self.scan(input, out);
        input.advance(used);
        self.state == State::Done
    }

    /// Runs the state machine over `input`, returning how many bytes were consumed.
    fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => return i,
                State::Text => {
                    // Fast path: copy the run up to the next octet that needs a decision.
                    let rest = &input[i..];
                    let run = memchr::memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
                    if run > 0 {
                        self.sink.content(&rest[..run], out, &mut self.flags);
                        i += run;
                        continue;
                    }
                    self.text_byte(input[i], out);
                    i += 1;
                }
                State::LineStart => {
                    match input[i] {
                        b'.' => self.state = State::Dot,
                        b => self.text_byte(b, out),
                    }
                    i += 1;
                }
                State::Dot => {
                    match input[i] {
                        b'\r' => self.state = State::DotCr,
                        // A leading dot followed by other characters is deleted (RFC 5321
                        // §4.5.2); the octet is then ordinary text (a bare LF stays bare: after
                        // ".\n" we are not at a line start).
                        b => {
                            self.state = State::Text;
                            self.text_byte(b, out);
                        }
                    }
                    i += 1;
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        self.state = State::Done;
                        return i + 1;
                    }
                    // ".\r" + other: the dot is deleted, the CR is bare; the octet is
                    // reconsidered as text (it may itself be a CR).
                    self.bare_cr(out);
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        self.sink.crlf(out, &mut self.flags);
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // Reconsider this octet as text after storing the bare CR.
                        self.bare_cr(out);
                    }
                }
            }
        }
        i
    }

    /// One octet inside a line (state becomes `Text` or `Cr`).
    fn text_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => {
                self.state = State::Cr;
                return;
            }
            b'\n' => self.flags.bare = true,
            0 => self.flags.nul = true,
            _ => {}
        }
        self.state = State::Text;
        self.sink.content(&[b], out, &mut self.flags);
    }

    /// A pending CR turned out not to be followed by LF.
    fn bare_cr(&mut self, out: &mut Vec<u8>) {
        self.flags.bare = true;
        self.sink.content(b"\r", out, &mut self.flags);
        self.state = State::Text;
    }

    /// True once the end-of-data sequence has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// After [`ingest`](Self::ingest) returned true: the body size, or why the message is
    /// refused (precedence: `TooLarge`, `BareLineEnding`, `NulByte`, `LineTooLong`). The body in
    /// `out` ends with the CRLF of its last line; the terminating `.\r\n` is not part of it.
    /// Called earlier, it reports what is known so far (an early `TooLarge` lets a server stop
    /// storing, though it must still read to the end).
    pub fn finish(&self) -> Result<u64, DataError> {
        self.flags.result(self.sink.size)
    }

    /// Body octets seen so far (after unstuffing), including those not stored.
    pub fn size(&self) -> u64 {
        self.sink.size
    }

    /// The line limit this receiver enforces, CRLF included.
    pub fn max_line_len(&self) -> usize {
        self.sink.max_line_len
    }
}

/// Where the BDAT line check stands (no dot-stuffing in BDAT, RFC 3030 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BdatState {
    Text,
    Cr,
}

/// Reads the chunks of one BDAT transaction (RFC 3030 §2). Chunks are counted exactly; line
/// checks (bare CR/LF, NUL, line length) run across chunk boundaries unless the body is
/// `BINARYMIME` (RFC 3030 §3).
#[derive(Debug, Clone)]
pub struct BdatReceiver {
    binary: bool,
    remaining: u64,
    total: u64,
    state: BdatState,
    sink: Sink,
    flags: Flags,
}

impl BdatReceiver {
    /// A receiver for one transaction of at most `max_size` octets in total, lines of at most
    /// `max_line_len` octets including CRLF; `binary` (BODY=BINARYMIME) turns the line checks
    /// off.
    pub fn new(max_size: u64, max_line_len: usize, binary: bool) -> Self {
        BdatReceiver {
            binary,
            remaining: 0,
            total: 0,
            state: BdatState::Text,
            sink: Sink::new(max_size, max_line_len),
            flags: Flags::default(),
        }
    }

    /// Starts a chunk of `size` octets (the argument of `BDAT`). Any rest of an unfinished
    /// chunk is forgotten.
    pub fn start_chunk(&mut self, size: u64) {
        self.remaining = size;
    }

    /// Consumes up to the remaining chunk bytes from `input`, appending them to `out` (once the
    /// total exceeds `max_size` they are discarded, but exactly the chunk size is still
    /// consumed). Returns true when the chunk is complete.
    pub fn ingest(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> bool {
        let available = u64::try_from(input.len()).unwrap_or(u64::MAX);
        // `take <= input.len()`, so the conversion back cannot fail.
        let take = usize::try_from(self.remaining.min(available)).unwrap_or(0);
        let chunk = &input[..take];
        if self.binary {
            self.sink.store(chunk, out, &mut self.flags);
        } else {
            self.check(chunk, out);
        }
        self.remaining -= u64::try_from(take).unwrap_or(0);
        self.total = self.total.saturating_add(u64::try_from(take).unwrap_or(0));
        input.advance(take);
        self.remaining == 0
    }

    /// Stores `chunk` line by line, running the line checks.
    fn check(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < chunk.len() {
            match self.state {
                // The CR is already stored (BDAT data is stored as is); only its check waits.
                BdatState::Cr => {
                    if chunk[i] == b'\n' {
                        self.sink.line_len = 0;
                        self.sink.store(b"\n", out, &mut self.flags);
                        i += 1;
                    } else {
                        self.flags.bare = true;
                        self.sink.count(1, &mut self.flags);
                    }
                    self.state = BdatState::Text;
                }
                BdatState::Text => {
                    let rest = &chunk[i..];
                    let run = memchr::memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
                    if run > 0 {
                        self.sink.content(&rest[..run], out, &mut self.flags);
                        i += run;
                        continue;
                    }
                    match rest[0] {
                        b'\r' => {
                            self.sink.store(b"\r", out, &mut self.flags);
                            self.state = BdatState::Cr;
                        }
                        b => {
                            if b == b'\n' {
                                self.flags.bare = true;
                            } else {
                                self.flags.nul = true;
                            }
                            self.sink.content(&[b], out, &mut self.flags);
                        }
                    }
                    i += 1;
                }
            }
        }
    }

    /// Octets of the current chunk still expected.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// After the `LAST` chunk: the message size, or why it is refused (precedence as for
    /// [`DataReceiver::finish`]). Also usable between chunks, e.g. to refuse early once the
    /// message is too large. A CR at the very end of the data received so far is not reported
    /// (its LF may come with the next chunk), so a body ending in a lone CR, or without a final
    /// CRLF, is accepted as sent; whoever relays it over DATA must complete the last line.
    pub fn finish(&self) -> Result<u64, DataError> {
        self.flags.result(self.total)
    }

    /// Octets received over all chunks so far, including discarded ones.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of the given sizes (cycled), returning (done, body, result,
    /// leftover input).
    fn run_data(
        input: &[u8],
        max_size: u64,
        max_line: usize,
        pieces: &[usize],
    ) -> (bool, Vec<u8>, Result<u64, DataError>, Vec<u8>) {
        let mut rx = DataReceiver::new(max_size, max_line);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pos = 0;
        let mut done = false;
        let mut k = 0;
        while pos < input.len() && !done {
            let n = pieces[k % pieces.len()].max(1).min(input.len() - pos);
            k += 1;
            buf.extend_from_slice(&input[pos..pos + n]);
            pos += n;
            done = rx.ingest(&mut buf, &mut out);
            if !done {
                assert!(buf.is_empty(), "consumes everything while not done");
            }
            assert!(u64::try_from(out.len()).unwrap_or(u64::MAX) <= max_size);
        }
        buf.extend_from_slice(&input[pos..]);
        (done, out, rx.finish(), buf.to_vec())
    }

    /// Runs whole, byte by byte and in pseudo-random splits; all must agree.
    fn data(
        input: &[u8],
        max_size: u64,
        max_line: usize,
    ) -> (bool, Vec<u8>, Result<u64, DataError>, Vec<u8>) {
        let whole = run_data(input, max_size, max_line, &[usize::MAX]);
        assert_eq!(
            run_data(input, max_size, max_line, &[1]),
            whole,
            "byte by byte"
        );
        let mut seed = 0x9e37_79b9_u32;
        for _ in 0..20 {
            let pieces: Vec<usize> = (0..7)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 9) as usize + 1
                })
                .collect();
            assert_eq!(
                run_data(input, max_size, max_line, &pieces),
                whole,
                "pieces {pieces:?}"
            );
        }
        whole
    }

    #[test]
    fn unstuffing_and_end() {
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            // (input, body, leftover)
            (b".\r\n", b"", b""),
            (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
            (b"a\r\n.\r\n", b"a\r\n", b""),
            (
                b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\n",
                b"Subject: x\r\n\r\nbody\r\n",
                b"MAIL FROM:<a@b>\r\n",
            ),
            (b"..\r\n.\r\n", b".\r\n", b""),
            (b"...x\r\n.\r\n", b"..x\r\n", b""),
            (b".x\r\n.\r\n", b"x\r\n", b""),
            (b"a.\r\n.b\r\n..\r\n.\r\n", b"a.\r\nb\r\n.\r\n", b""),
            (b"\r\n\r\n.\r\n", b"\r\n\r\n", b""),
            (b"a\r\n.\r\n.\r\n", b"a\r\n", b".\r\n"),
        ];
        for (input, body, rest) in cases {
            let (done, out, result, left) = data(input, 1 << 20, MAX_TEXT_LINE);
            assert!(done, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(out, *body, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(result, Ok(body.len() as u64));
            assert_eq!(left, *rest);
        }
    }

    #[test]
    fn smuggling_variants_never_end() {
        let variants: &[&[u8]] = &[
            b"\n.\n",
            b"\r.\r\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r\n.\rX",
            b"\r.\n",
            b"\n.\r",
            b"\r\r\n.\r",
            b"\r\n.\r\r",
            b"\r\n.\x00\r\n",
        ];
        for v in variants {
            // (a prefix ending in CR would turn some variants into a real CRLF.CRLF)
            for prefix in [&b""[..], b"x", b"x\r\n"] {
                let mut input = prefix.to_vec();
                input.extend_from_slice(v);
                input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n");
                let (done, _, _, _) = data(&input, 1 << 20, MAX_TEXT_LINE);
                assert!(!done, "ended on {:?}", String::from_utf8_lossy(&input));
                // the real end still works and the message is refused
                input.extend_from_slice(b"\r\n.\r\nNEXT");
                let (done, _, result, left) = data(&input, 1 << 20, MAX_TEXT_LINE);
                assert!(done, "{:?}", String::from_utf8_lossy(&input));
                assert_eq!(left, b"NEXT");
                assert!(
                    matches!(result, Err(DataError::BareLineEnding | DataError::NulByte)),
                    "{:?}: {result:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    #[test]
    fn bare_line_endings_rejected() {
        let cases: &[&[u8]] = &[
            b"a\nb\r\n.\r\n",
            b"a\rb\r\n.\r\n",
            b"a\r\r\n.\r\n",
            b"\n.\r\n.\r\n",
            b".\n.\r\n.\r\n",
            b".\rx\r\n.\r\n",
        ];
        for input in cases {
            let (done, _, result, left) = data(input, 1 << 20, MAX_TEXT_LINE);
            assert!(done);
            assert!(left.is_empty());
            assert_eq!(
                result,
                Err(DataError::BareLineEnding),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // ".\r" then another CRLF: the dot is deleted, the first CR is bare
        let (done, out, result, _) = data(b".\r\r\n.\r\n", 1 << 20, MAX_TEXT_LINE);
        assert!(done);
        assert_eq!(out, b"\r\r\n");
        assert_eq!(result, Err(DataError::BareLineEnding));
    }

    #[test]
    fn nul_and_line_length() {
        let (done, _, result, _) = data(b"a\x00b\r\n.\r\n", 1 << 20, MAX_TEXT_LINE);
        assert!(done);
        assert_eq!(result, Err(DataError::NulByte));

        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(data(&ok, 1 << 20, MAX_TEXT_LINE).2, Ok(1000));
        // the transparency dot does not count (RFC 5321 §4.5.3.1.6)
        let mut stuffed = vec![b'.'];
        stuffed.extend_from_slice(&ok);
        assert_eq!(data(&stuffed, 1 << 20, MAX_TEXT_LINE).2, Ok(1000));
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            data(&long, 1 << 20, MAX_TEXT_LINE).2,
            Err(DataError::LineTooLong)
        );
        assert_eq!(DataReceiver::new(10, 77).max_line_len(), 77);
    }

    #[test]
    fn size_limit_bounds_memory() {
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend_from_slice(b"0123456789\r\n");
        }
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let (done, out, result, left) = data(&input, 1200, MAX_TEXT_LINE);
        assert!(done);
        assert_eq!(result, Ok(1200));
        assert_eq!(out.len(), 1200);
        assert_eq!(left, b"QUIT\r\n");
        let (done, out, result, left) = data(&input, 100, MAX_TEXT_LINE);
        assert!(done);
        assert_eq!(result, Err(DataError::TooLarge));
        assert_eq!(out, &input[..100]);
        assert_eq!(left, b"QUIT\r\n");
        // TooLarge takes precedence over everything else
        let (_, _, result, _) = data(b"a\nb\x00\r\n.\r\n", 2, MAX_TEXT_LINE);
        assert_eq!(result, Err(DataError::TooLarge));
        // a bare LF beats a NUL and a long line
        let (_, _, result, _) = data(b"a\nb\x00cdefgh\r\n.\r\n", 100, 5);
        assert_eq!(result, Err(DataError::BareLineEnding));
    }

    #[test]
    fn done_is_sticky() {
        let mut rx = DataReceiver::new(100, 1000);
        let mut buf = BytesMut::from(&b".\r\nRSET\r\n"[..]);
        let mut out = Vec::new();
        assert!(rx.ingest(&mut buf, &mut out));
        assert!(rx.is_done());
        assert!(rx.ingest(&mut buf, &mut out));
        assert_eq!(&buf[..], b"RSET\r\n");
        assert_eq!(rx.size(), 0);
    }

    #[test]
    fn replies() {
        let wire = |e: DataError| String::from_utf8_lossy(&e.reply().to_bytes()).into_owned();
        assert_eq!(
            wire(DataError::TooLarge),
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert_eq!(
            wire(DataError::BareLineEnding),
            "550 5.5.2 Message contains bare CR or LF (RFC 5321 section 2.3.8)\r\n"
        );
        assert_eq!(
            wire(DataError::LineTooLong),
            "550 5.5.2 Message contains a line longer than 1000 octets\r\n"
        );
        assert_eq!(
            wire(DataError::NulByte),
            "550 5.6.0 Message contains NUL octets\r\n"
        );
    }

    /// Feeds BDAT chunks, each split into pieces; returns (body, result, leftover).
    fn run_bdat(
        chunks: &[&[u8]],
        trailer: &[u8],
        max_size: u64,
        max_line: usize,
        binary: bool,
        piece: usize,
    ) -> (Vec<u8>, Result<u64, DataError>, Vec<u8>, u64) {
        let mut rx = BdatReceiver::new(max_size, max_line, binary);
        let mut out = Vec::new();
        let mut buf = BytesMut::new();
        for (n, chunk) in chunks.iter().enumerate() {
            rx.start_chunk(chunk.len() as u64);
            let mut wire = chunk.to_vec();
            if n + 1 == chunks.len() {
                wire.extend_from_slice(trailer);
            }
            let mut done = chunk.is_empty() && rx.ingest(&mut buf, &mut out);
            for p in wire.chunks(piece) {
                buf.extend_from_slice(p);
                if !done {
                    done = rx.ingest(&mut buf, &mut out);
                }
            }
            assert!(done);
            assert_eq!(rx.remaining(), 0);
            assert!(out.len() as u64 <= max_size);
        }
        (out, rx.finish(), buf.to_vec(), rx.total())
    }

    fn bdat(
        chunks: &[&[u8]],
        max_size: u64,
        max_line: usize,
        binary: bool,
    ) -> (Vec<u8>, Result<u64, DataError>) {
        let whole = run_bdat(chunks, b"QUIT\r\n", max_size, max_line, binary, usize::MAX);
        for piece in [1, 2, 3, 5] {
            assert_eq!(
                run_bdat(chunks, b"QUIT\r\n", max_size, max_line, binary, piece),
                whole
            );
        }
        assert_eq!(whole.2, b"QUIT\r\n");
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        assert_eq!(whole.3, total as u64);
        (whole.0, whole.1)
    }

    #[test]
    fn bdat_chunks() {
        assert_eq!(
            bdat(&[b"a\r\nb\r\n"], 100, 1000, false),
            (b"a\r\nb\r\n".to_vec(), Ok(6))
        );
        // no dot-stuffing in BDAT
        assert_eq!(
            bdat(&[b"..\r\n.\r\n"], 100, 1000, false),
            (b"..\r\n.\r\n".to_vec(), Ok(7))
        );
        // CRLF split across chunks is fine
        assert_eq!(
            bdat(&[b"a\r", b"\nb\r\n"], 100, 1000, false),
            (b"a\r\nb\r\n".to_vec(), Ok(6))
        );
        assert_eq!(bdat(&[b"a\r\n", b"", b"b\r\n"], 100, 1000, false).1, Ok(6));
        // bare CR / LF across chunk boundaries
        assert_eq!(
            bdat(&[b"a\r", b"b\r\n"], 100, 1000, false).1,
            Err(DataError::BareLineEnding)
        );
        assert_eq!(
            bdat(&[b"a\r\n", b"\nb\r\n"], 100, 1000, false).1,
            Err(DataError::BareLineEnding)
        );
        assert_eq!(
            bdat(&[b"a\x00\r\n"], 100, 1000, false).1,
            Err(DataError::NulByte)
        );
        // line length counts across chunks
        assert_eq!(
            bdat(&[b"abc", b"de\r\n"], 100, 6, false).1,
            Err(DataError::LineTooLong)
        );
        assert_eq!(bdat(&[b"abc", b"d\r\n"], 100, 6, false).1, Ok(6));
        // binary: no line checks at all
        assert_eq!(
            bdat(&[b"a\rb\nc\x00", b"\n"], 100, 2, true),
            (b"a\rb\nc\x00\n".to_vec(), Ok(7))
        );
        // too large: stored prefix bounded, chunk still consumed exactly
        let (out, result) = bdat(&[b"0123456789", b"0123456789"], 15, 1000, false);
        assert_eq!(out, b"012345678901234");
        assert_eq!(result, Err(DataError::TooLarge));
        let (out, result) = bdat(&[b"0123456789", b"0123\n56789"], 15, 1000, true);
        assert_eq!(out.len(), 15);
        assert_eq!(result, Err(DataError::TooLarge));
    }

    #[test]
    fn bdat_too_large_mid_transaction() {
        let mut rx = BdatReceiver::new(4, 1000, false);
        let mut out = Vec::new();
        rx.start_chunk(6);
        let mut buf = BytesMut::from(&b"abc\r\nxBDAT"[..]);
        assert!(rx.ingest(&mut buf, &mut out));
        assert_eq!(&buf[..], b"BDAT");
        assert_eq!(rx.finish(), Err(DataError::TooLarge));
        assert_eq!(rx.total(), 6);
        assert_eq!(out, b"abc\r");
    }
}
