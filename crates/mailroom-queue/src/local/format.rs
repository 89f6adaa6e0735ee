//! The on-disk format of one spooled message, `<ULID>.msg`.
//!
//! ```text
//! offset  size      field
//! 0       4         magic "MRQ1" (format version 1)
//! 4       4         envelope length E, u32 little-endian
//! 8       8         body length B, u64 little-endian
//! 16      4         CRC-32C of the envelope bytes, u32 little-endian
//! 20      E         envelope, JSON
//! 20+E    B         body (the RFC 5322 message, as received)
//! 20+E+B  4         CRC-32C of the body, u32 little-endian
//! ```
//!
//! The file length must be exactly `24 + E + B`, so a truncated (torn) file is detected from
//! its header alone. Rebuilding the index at open reads only header and envelope (checking the
//! length and the envelope checksum); reading the message checks the body checksum too.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use bytes::Bytes;

use crate::{Envelope, QueueError, StoredMessage};

/// Magic and version.
pub(crate) const MAGIC: &[u8; 4] = b"MRQ1";
/// Length of the fixed header.
pub(crate) const HEADER_LEN: usize = 20;
/// Length of the trailer (body checksum).
pub(crate) const TRAILER_LEN: usize = 4;
/// Upper bound for the envelope, against reading garbage lengths.
const MAX_ENVELOPE_LEN: u32 = 64 << 20;

/// The encoded head (header + envelope JSON) and trailer of a message; the body goes between.
pub(crate) struct Encoded {
    /// Header followed by the envelope JSON.
    pub head: Vec<u8>,
    /// The body checksum.
    pub trailer: [u8; TRAILER_LEN],
}

/// Encodes the envelope and computes the checksums.
pub(crate) fn encode(message: &StoredMessage) -> Result<Encoded, QueueError> {
    let json = serde_json::to_vec(&message.envelope).map_err(|source| QueueError::Encode {
        id: message.envelope.id,
        source,
    })?;
    let env_len = u32::try_from(json.len())
        .ok()
        .filter(|len| *len <= MAX_ENVELOPE_LEN)
        .ok_or_else(|| QueueError::Encode {
            id: message.envelope.id,
            source: serde::ser::Error::custom("envelope larger than 64 MiB"),
        })?;
    let mut head = Vec::with_capacity(HEADER_LEN + json.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&env_len.to_le_bytes());
    head.extend_from_slice(&(message.body.len() as u64).to_le_bytes());
    head.extend_from_slice(&crc32c(&json).to_le_bytes());
    head.extend_from_slice(&json);
    Ok(Encoded {
        head,
        trailer: crc32c(&message.body).to_le_bytes(),
    })
}

/// The parsed fixed header.
struct Header {
    env_len: usize,
    body_len: u64,
    env_crc: u32,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> QueueError {
    QueueError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses the fixed header and checks it against the file length.
fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<Header, QueueError> {
    let field = |range: std::ops::Range<usize>| header.get(range).unwrap_or_default();
    if header.len() < HEADER_LEN {
        return Err(corrupt(
            path,
            format!("file is {file_len} bytes, shorter than the header"),
        ));
    }
    if field(0..4) != MAGIC {
        return Err(corrupt(path, "bad magic (not an MRQ1 queue file)"));
    }
    let mut u32_buf = [0u8; 4];
    let mut u64_buf = [0u8; 8];
    u32_buf.copy_from_slice(field(4..8));
    let env_len = u32::from_le_bytes(u32_buf);
    u64_buf.copy_from_slice(field(8..16));
    let body_len = u64::from_le_bytes(u64_buf);
    u32_buf.copy_from_slice(field(16..20));
    let env_crc = u32::from_le_bytes(u32_buf);
    if env_len > MAX_ENVELOPE_LEN {
        return Err(corrupt(
            path,
            format!("envelope length {env_len} too large"),
        ));
    }
    let expected = (HEADER_LEN as u64 + TRAILER_LEN as u64 + u64::from(env_len))
        .checked_add(body_len)
        .ok_or_else(|| corrupt(path, "body length overflows"))?;
    if expected != file_len {
        return Err(corrupt(
            path,
            format!("file is {file_len} bytes, header says {expected} (torn write?)"),
        ));
    }
    Ok(Header {
        env_len: env_len as usize,
        body_len,
        env_crc,
    })
}

/// Checks the envelope checksum, parses it, and checks its id against the file name.
fn parse_envelope(path: &Path, json: &[u8], expected_crc: u32) -> Result<Envelope, QueueError> {
    if crc32c(json) != expected_crc {
        return Err(corrupt(path, "envelope checksum mismatch"));
    }
    let envelope: Envelope = serde_json::from_slice(json)
        .map_err(|e| corrupt(path, format!("envelope is not valid JSON: {e}")))?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if stem != envelope.id.to_string() {
        return Err(corrupt(
            path,
            format!("file name does not match envelope id {}", envelope.id),
        ));
    }
    Ok(envelope)
}

/// Reads header and envelope of the file (not the body) and returns the envelope and the body
/// length. Checks magic, lengths and the envelope checksum.
pub(crate) fn read_envelope(path: &Path) -> Result<(Envelope, u64), QueueError> {
    let mut file = File::open(path).map_err(|e| QueueError::io("open", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| QueueError::io("stat", path, e))?
        .len();
    let mut header = [0u8; HEADER_LEN];
    let header_read =
        read_up_to(&mut file, &mut header).map_err(|e| QueueError::io("read", path, e))?;
    let header = parse_header(
        path,
        header.get(..header_read).unwrap_or_default(),
        file_len,
    )?;
    let mut json = vec![0u8; header.env_len];
    file.read_exact(&mut json)
        .map_err(|e| QueueError::io("read", path, e))?;
    let envelope = parse_envelope(path, &json, header.env_crc)?;
    Ok((envelope, header.body_len))
}

/// Decodes a whole file, checking everything including the body checksum. The returned body
/// shares `data`'s allocation.
pub(crate) fn decode(path: &Path, data: Bytes) -> Result<StoredMessage, QueueError> {
    let file_len = data.len() as u64;
    let header = parse_header(path, data.get(..HEADER_LEN).unwrap_or(&data), file_len)?;
    let env_end = HEADER_LEN + header.env_len;
    let body_end = data.len() - TRAILER_LEN;
    let envelope = parse_envelope(
        path,
        data.get(HEADER_LEN..env_end).unwrap_or_default(),
        header.env_crc,
    )?;
    let body = data.slice(env_end..body_end);
    let mut crc_buf = [0u8; 4];
    crc_buf.copy_from_slice(data.get(body_end..).unwrap_or(&[0; 4]));
    if crc32c(&body) != u32::from_le_bytes(crc_buf) {
        return Err(corrupt(path, "body checksum mismatch"));
    }
    Ok(StoredMessage { envelope, body })
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// CRC-32C (Castagnoli) of `data`, with the CPU's CRC instruction where there is one (the
/// `crc32c` crate): a 100 KB body costs microseconds, not the ~150 us of a byte-wise table.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
