//! `xtext` encoding of ESMTP parameter values (RFC 3461 §4), used by `ENVID=`, `ORCPT=` and
//! `AUTH=` (RFC 4954 §5). The server decodes with [`decode`] while parsing MAIL/RCPT
//! parameters; the client re-encodes with [`encode`] when relaying them.
//!
//! ```text
//! xtext = *( xchar / hexchar )
//! xchar = any ASCII CHAR between "!" (33) and "~" (126) inclusive, except for "+" and "="
//! hexchar = ASCII "+" immediately followed by two upper case hexadecimal digits
//! ```

/// Why an xtext value did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XtextError {
    /// A character outside `xchar` (space, `=`, control or non-ASCII).
    #[error("invalid character in xtext")]
    InvalidChar,
    /// A `+` not followed by two hexadecimal digits.
    #[error("invalid +XX escape in xtext")]
    InvalidEscape,
    /// The decoded octets are not UTF-8.
    #[error("xtext does not decode to UTF-8")]
    InvalidUtf8,
    /// The decoded value contains a control character (CR, LF, NUL, ...).
    #[error("xtext decodes to a control character")]
    ControlChar,
}

/// Encodes `s` as xtext: `xchar`s are kept, every other octet (including `+`, `=`, space and
/// each octet of a non-ASCII character) becomes `+XX` with upper-case hex digits.
pub fn encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if is_xchar(b) {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Decodes an xtext value. Lower-case hex digits are accepted (RFC 3461 asks for upper case;
/// being lenient here loses nothing). Stricter than RFC 3461 in one point: a decoded control
/// character is refused, because these values end up in DSN header fields (RFC 3464 §2.2.1
/// `Original-Envelope-Id`, §2.3.1 `Original-Recipient`) where CR/LF would inject headers.
pub fn decode(s: &str) -> Result<String, XtextError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'+' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(XtextError::InvalidEscape);
            };
            out.push((hi << 4) | lo);
            i += 3;
        } else if is_xchar(b) {
            out.push(b);
            i += 1;
        } else {
            return Err(XtextError::InvalidChar);
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| XtextError::InvalidUtf8)?;
    if decoded.chars().any(char::is_control) {
        return Err(XtextError::ControlChar);
    }
    Ok(decoded)
}

/// True when `s` is syntactically valid xtext (without checking what it decodes to).
pub fn is_valid(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'+' {
            let ok = bytes.get(i + 1).copied().and_then(hex_value).is_some()
                && bytes.get(i + 2).copied().and_then(hex_value).is_some();
            if !ok {
                return false;
            }
            i += 3;
        } else if is_xchar(b) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

fn is_xchar(b: u8) -> bool {
    matches!(b, 33..=126) && b != b'+' && b != b'='
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_table() {
        let cases = [
            ("abc", "abc"),
            ("a+b=c", "a+2Bb+3Dc"),
            ("a b", "a+20b"),
            ("é", "+C3+A9"),
            ("", ""),
            ("rfc822;x@y", "rfc822;x@y"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(encode(plain), encoded, "{plain}");
            assert_eq!(decode(encoded).as_deref(), Ok(plain), "{encoded}");
            assert!(is_valid(encoded));
        }
    }

    #[test]
    fn decode_table() {
        let cases: &[(&str, Result<&str, XtextError>)] = &[
            ("a+2bb", Ok("a+b")),
            ("+", Err(XtextError::InvalidEscape)),
            ("+2", Err(XtextError::InvalidEscape)),
            ("+2G", Err(XtextError::InvalidEscape)),
            ("a=b", Err(XtextError::InvalidChar)),
            ("a b", Err(XtextError::InvalidChar)),
            ("é", Err(XtextError::InvalidChar)),
            ("+FF", Err(XtextError::InvalidUtf8)),
            ("a+0D+0Ab", Err(XtextError::ControlChar)),
            ("+00", Err(XtextError::ControlChar)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                decode(input).as_deref().map_err(|e| *e),
                *expected,
                "{input}"
            );
        }
        assert!(!is_valid("a=b"));
        assert!(!is_valid("+1"));
    }
}
