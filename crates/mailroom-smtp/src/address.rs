//! Mailbox addresses of the envelope (RFC 5321 §4.1.2, SMTPUTF8 RFC 6531 §3.3).
//!
//! `command` calls `parse_path` for the `<...>` argument of `MAIL FROM` and `RCPT TO`; the
//! resulting [`ReversePath`] / [`ForwardPath`] travel through the plugin hooks into the queued
//! envelope and back out to the SMTP client, whose commands are built with the `Display` impls
//! here. Parsing is syntactic only: UTF-8 local parts and domains are accepted (RFC 6531 §3.3);
//! whether they are allowed without the `SMTPUTF8` parameter is the server's decision
//! ([`Mailbox::is_ascii`]).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Maximum length of a local part in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART_LEN: usize = 64;
/// Maximum length of a domain in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN_LEN: usize = 255;
/// Maximum length of a path, angle brackets included, in octets (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH_LEN: usize = 256;
/// Maximum length of one DNS label in octets (RFC 1035 §2.3.4); checked for ASCII labels only.
const MAX_LABEL_LEN: usize = 63;

/// `local-part@domain` as received. The local part is kept unquoted (the quoting is re-applied by
/// `Display` when needed); the domain is kept as sent (an A-label, U-label or address literal).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mailbox {
    /// Local part, with quoted-string quoting removed.
    pub local: String,
    /// Domain or address literal (`[192.0.2.1]`) as sent.
    pub domain: String,
}

/// The reverse-path of `MAIL FROM`: a mailbox or the null path `<>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReversePath {
    /// `<>`: the null sender (bounces, RFC 5321 §4.5.5).
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

/// The forward-path of `RCPT TO`: a mailbox or the bare `<Postmaster>` (RFC 5321 §4.5.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardPath {
    /// `<Postmaster>` without a domain (any case).
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Mailbox),
}

/// Why an address or path did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The path does not start with `<` or does not end with `>`.
    #[error("address must be enclosed in angle brackets")]
    MissingBrackets,
    /// Characters follow the closing `>` without a separating space.
    #[error("unexpected characters after the address")]
    TrailingCharacters,
    /// The source route (`@a,@b:`) is malformed (RFC 5321 §4.1.2).
    #[error("malformed source route")]
    InvalidSourceRoute,
    /// The local part is neither a dot-string nor a quoted-string.
    #[error("malformed local part")]
    InvalidLocalPart,
    /// The `@` between local part and domain is missing.
    #[error("missing @ in address")]
    MissingAt,
    /// The domain is not a valid domain name.
    #[error("malformed domain")]
    InvalidDomain,
    /// The address literal (`[...]`) is malformed (RFC 5321 §4.1.3).
    #[error("malformed address literal")]
    InvalidAddressLiteral,
    /// The local part is longer than 64 octets (RFC 5321 §4.5.3.1.1).
    #[error("local part longer than 64 octets")]
    LocalPartTooLong,
    /// The domain is longer than 255 octets (RFC 5321 §4.5.3.1.2).
    #[error("domain longer than 255 octets")]
    DomainTooLong,
    /// The path is longer than 256 octets (RFC 5321 §4.5.3.1.3).
    #[error("path longer than 256 octets")]
    PathTooLong,
    /// The null path `<>` where a mailbox is required (RCPT TO).
    #[error("null path not allowed here")]
    NullNotAllowed,
}

impl Mailbox {
    /// Parses a bare `local@domain` (no angle brackets, no source route).
    pub fn parse(s: &str) -> Result<Mailbox, AddressError> {
        let mut p = Cursor::new(s.as_bytes());
        let mailbox = parse_mailbox(&mut p)?;
        if !p.at_end() {
            return Err(AddressError::TrailingCharacters);
        }
        Ok(mailbox)
    }

    /// True when both the local part and the domain are ASCII, i.e. the address may be used
    /// without the `SMTPUTF8` parameter (RFC 6531 §3.4).
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// The domain in lower case, for comparisons and routing. Domains are case-insensitive
    /// (RFC 5321 §2.4); U-labels are lower-cased with Unicode rules, which approximates but is
    /// not full IDNA (UTS #46) mapping.
    pub fn domain_lowercase(&self) -> String {
        if self.domain.is_ascii() {
            self.domain.to_ascii_lowercase()
        } else {
            self.domain.to_lowercase()
        }
    }

    /// True when the domain is an address literal such as `[192.0.2.1]` (RFC 5321 §4.1.3).
    pub fn is_address_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// True when the local part must be quoted on the wire (it is not a dot-string,
    /// RFC 5321 §4.1.2).
    pub fn local_needs_quoting(&self) -> bool {
        !is_dot_string(self.local.as_bytes())
    }
}

impl fmt::Display for Mailbox {
    /// Writes `local@domain`, re-quoting the local part as a quoted-string (with `\"` and `\\`
    /// escapes) when it is not a dot-string (RFC 5321 §4.1.2).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.local_needs_quoting() {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        } else {
            f.write_str(&self.local)?;
        }
        write!(f, "@{}", self.domain)
    }
}

impl FromStr for Mailbox {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mailbox::parse(s)
    }
}

impl fmt::Display for ReversePath {
    /// Writes the path as it appears in `MAIL FROM:`, angle brackets included: `<>` or `<a@b>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

impl fmt::Display for ForwardPath {
    /// Writes the path as it appears in `RCPT TO:`, angle brackets included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<Postmaster>"),
            ForwardPath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

impl ReversePath {
    /// The mailbox, unless this is the null path.
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(m),
        }
    }

    /// True when the path is ASCII-only (the null path always is).
    pub fn is_ascii(&self) -> bool {
        self.mailbox().is_none_or(Mailbox::is_ascii)
    }
}

impl ForwardPath {
    /// The mailbox, unless this is the bare `<Postmaster>`.
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ForwardPath::Postmaster => None,
            ForwardPath::Mailbox(m) => Some(m),
        }
    }

    /// True when the path is ASCII-only (`<Postmaster>` always is).
    pub fn is_ascii(&self) -> bool {
        self.mailbox().is_none_or(Mailbox::is_ascii)
    }
}

/// What [`parse_path`] may accept besides a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathKind {
    /// MAIL FROM: `<>` allowed.
    Reverse,
    /// RCPT TO: `<Postmaster>` allowed.
    Forward,
}

/// A parsed path before it is turned into a [`ReversePath`] or [`ForwardPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Path {
    Null,
    Postmaster,
    Mailbox(Mailbox),
}

/// Parses `<[A-d-l ":"] Mailbox>` (or `<>` / `<Postmaster>` depending on `kind`) from the start
/// of `input`, returning the path and the number of bytes it used. The source route is accepted
/// and discarded (RFC 5321 §4.1.2 and Appendix C).
pub(crate) fn parse_path(input: &[u8], kind: PathKind) -> Result<(Path, usize), AddressError> {
    let mut p = Cursor::new(input);
    if !p.eat(b'<') {
        return Err(AddressError::MissingBrackets);
    }
    let path = if p.eat(b'>') {
        match kind {
            PathKind::Reverse => Path::Null,
            PathKind::Forward => return Err(AddressError::NullNotAllowed),
        }
    } else if kind == PathKind::Forward && p.eat_ci(b"postmaster>") {
        Path::Postmaster
    } else {
        if p.peek() == Some(b'@') {
            parse_source_route(&mut p)?;
        }
        let mailbox = parse_mailbox(&mut p)?;
        if !p.eat(b'>') {
            return Err(match p.peek() {
                None => AddressError::MissingBrackets,
                Some(_) => AddressError::InvalidDomain,
            });
        }
        Path::Mailbox(mailbox)
    };
    if p.pos > MAX_PATH_LEN {
        return Err(AddressError::PathTooLong);
    }
    Ok((path, p.pos))
}

/// `A-d-l ":"` where `A-d-l = At-domain *( "," At-domain )`, `At-domain = "@" Domain`.
fn parse_source_route(p: &mut Cursor<'_>) -> Result<(), AddressError> {
    loop {
        if !p.eat(b'@') {
            return Err(AddressError::InvalidSourceRoute);
        }
        parse_domain(p).map_err(|_| AddressError::InvalidSourceRoute)?;
        if p.eat(b':') {
            return Ok(());
        }
        if !p.eat(b',') {
            return Err(AddressError::InvalidSourceRoute);
        }
    }
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`.
fn parse_mailbox(p: &mut Cursor<'_>) -> Result<Mailbox, AddressError> {
    let start = p.pos;
    let local = if p.peek() == Some(b'"') {
        parse_quoted_string(p)?
    } else {
        parse_dot_string(p)?
    };
    if p.pos - start > MAX_LOCAL_PART_LEN {
        return Err(AddressError::LocalPartTooLong);
    }
    if !p.eat(b'@') {
        return Err(AddressError::MissingAt);
    }
    let domain = parse_domain(p)?;
    Ok(Mailbox { local, domain })
}

/// `Dot-string = Atom *("." Atom)` with `atext` extended by UTF-8 (RFC 6531 §3.3).
fn parse_dot_string(p: &mut Cursor<'_>) -> Result<String, AddressError> {
    let start = p.pos;
    while let Some(b) = p.peek() {
        if is_atext(b) || b == b'.' {
            p.pos += 1;
        } else {
            break;
        }
    }
    let raw = &p.input[start..p.pos];
    if !is_dot_string(raw) {
        return Err(AddressError::InvalidLocalPart);
    }
    utf8(raw).ok_or(AddressError::InvalidLocalPart)
}

/// `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`; returns the content without quoting.
fn parse_quoted_string(p: &mut Cursor<'_>) -> Result<String, AddressError> {
    if !p.eat(b'"') {
        return Err(AddressError::InvalidLocalPart);
    }
    let mut out = Vec::new();
    loop {
        match p.next() {
            None => return Err(AddressError::InvalidLocalPart),
            Some(b'"') => break,
            // quoted-pairSMTP = %d92 %d32-126
            Some(b'\\') => match p.next() {
                Some(c @ 32..=126) => out.push(c),
                _ => return Err(AddressError::InvalidLocalPart),
            },
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii
            Some(c @ (32..=126 | 0x80..=0xff)) => out.push(c),
            Some(_) => return Err(AddressError::InvalidLocalPart),
        }
    }
    String::from_utf8(out).map_err(|_| AddressError::InvalidLocalPart)
}

/// `Domain / address-literal`, kept as sent.
fn parse_domain(p: &mut Cursor<'_>) -> Result<String, AddressError> {
    let start = p.pos;
    if p.peek() == Some(b'[') {
        while let Some(b) = p.next() {
            if b == b']' {
                break;
            }
        }
        let raw = &p.input[start..p.pos];
        if raw.len() > MAX_DOMAIN_LEN {
            return Err(AddressError::DomainTooLong);
        }
        if !is_address_literal(raw) {
            return Err(AddressError::InvalidAddressLiteral);
        }
        return utf8(raw).ok_or(AddressError::InvalidAddressLiteral);
    }
    while let Some(b) = p.peek() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b >= 0x80 {
            p.pos += 1;
        } else {
            break;
        }
    }
    let raw = &p.input[start..p.pos];
    if raw.len() > MAX_DOMAIN_LEN {
        return Err(AddressError::DomainTooLong);
    }
    if !is_domain(raw) {
        return Err(AddressError::InvalidDomain);
    }
    utf8(raw).ok_or(AddressError::InvalidDomain)
}

/// `atext` (RFC 5322 §3.2.3) plus any non-ASCII octet (validated as UTF-8 afterwards).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

/// True for `Atom *("." Atom)`: non-empty atoms, no leading, trailing or doubled dots.
fn is_dot_string(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|&b| is_atext(b)))
}

/// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]` or a U-label
/// (RFC 6531 §3.3). ASCII labels are limited to 63 octets (RFC 1035 §2.3.4).
fn is_domain(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|&b| b == b'.').all(|label| {
            let (Some(&first), Some(&last)) = (label.first(), label.last()) else {
                return false;
            };
            let ascii = label.is_ascii();
            (first.is_ascii_alphanumeric() || first >= 0x80)
                && (last.is_ascii_alphanumeric() || last >= 0x80)
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
                && (!ascii || label.len() <= MAX_LABEL_LEN)
        })
}

/// `address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
/// General-address-literal ) "]"` (RFC 5321 §4.1.3).
fn is_address_literal(s: &[u8]) -> bool {
    let Some(inner) = s.strip_prefix(b"[").and_then(|s| s.strip_suffix(b"]")) else {
        return false;
    };
    let Ok(inner) = std::str::from_utf8(inner) else {
        return false;
    };
    if inner.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let Some((tag, rest)) = inner.split_once(':') else {
        return false;
    };
    if tag.eq_ignore_ascii_case("IPv6") {
        return rest.parse::<Ipv6Addr>().is_ok();
    }
    // General-address-literal = Standardized-tag ":" 1*dcontent; dcontent = %d33-90 / %d94-126
    let tag = tag.as_bytes();
    is_domain(tag)
        && tag.is_ascii()
        && !rest.is_empty()
        && rest.bytes().all(|b| matches!(b, 33..=90 | 94..=126))
}

fn utf8(raw: &[u8]) -> Option<String> {
    std::str::from_utf8(raw).ok().map(str::to_owned)
}

/// A read position over a byte slice.
struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(input: &'a [u8]) -> Self {
        Cursor { input, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Consumes `word` if the input continues with it, ASCII case-insensitively.
    fn eat_ci(&mut self, word: &[u8]) -> bool {
        match self.input.get(self.pos..self.pos + word.len()) {
            Some(s) if s.eq_ignore_ascii_case(word) => {
                self.pos += word.len();
                true
            }
            _ => false,
        }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn parse_mailboxes() {
        let ok: &[(&str, Mailbox)] = &[
            ("a@b", mb("a", "b")),
            ("first.last@example.com", mb("first.last", "example.com")),
            ("a+tag@sub.example.com", mb("a+tag", "sub.example.com")),
            ("\"a b\"@d", mb("a b", "d")),
            ("\"a\\\"b\\\\c\"@d", mb("a\"b\\c", "d")),
            ("\"\"@d", mb("", "d")),
            ("u@[192.0.2.1]", mb("u", "[192.0.2.1]")),
            ("u@[IPv6:2001:db8::1]", mb("u", "[IPv6:2001:db8::1]")),
            ("u@[ipv6:::1]", mb("u", "[ipv6:::1]")),
            ("u@[x-tag:abc]", mb("u", "[x-tag:abc]")),
            ("josé@exämple.de", mb("josé", "exämple.de")),
            ("用户@例子.广告", mb("用户", "例子.广告")),
            ("x@xn--bcher-kva.example", mb("x", "xn--bcher-kva.example")),
            ("x@1.2.3.4", mb("x", "1.2.3.4")),
        ];
        for (input, expected) in ok {
            assert_eq!(Mailbox::parse(input).as_ref(), Ok(expected), "{input}");
        }
        let long_local = format!("{}@d", "a".repeat(65));
        let long_domain = format!("a@{}.com", "d".repeat(252));
        let long_label = format!("a@{}.com", "d".repeat(64));
        let err: &[(&str, AddressError)] = &[
            ("", AddressError::InvalidLocalPart),
            ("a", AddressError::MissingAt),
            ("@d", AddressError::InvalidLocalPart),
            ("a@", AddressError::InvalidDomain),
            ("a..b@d", AddressError::InvalidLocalPart),
            (".a@d", AddressError::InvalidLocalPart),
            ("a.@d", AddressError::InvalidLocalPart),
            ("a b@d", AddressError::MissingAt),
            ("\"a@d", AddressError::InvalidLocalPart),
            ("\"a\u{1}\"@d", AddressError::InvalidLocalPart),
            ("a@-d.com", AddressError::InvalidDomain),
            ("a@d-.com", AddressError::InvalidDomain),
            ("a@d..com", AddressError::InvalidDomain),
            ("a@d.com.", AddressError::InvalidDomain),
            ("a@d_x.com", AddressError::TrailingCharacters),
            ("a@[192.0.2.256]", AddressError::InvalidAddressLiteral),
            ("a@[192.0.2.1", AddressError::InvalidAddressLiteral),
            ("a@[IPv6:zz::1]", AddressError::InvalidAddressLiteral),
            ("a@[]", AddressError::InvalidAddressLiteral),
            (&long_local, AddressError::LocalPartTooLong),
            (&long_domain, AddressError::DomainTooLong),
            (&long_label, AddressError::InvalidDomain),
        ];
        for (input, expected) in err {
            assert_eq!(Mailbox::parse(input), Err(*expected), "{input}");
        }
    }

    #[test]
    fn invalid_utf8_rejected() {
        let mut p = Cursor::new(b"\xff\xfe@d");
        assert_eq!(parse_mailbox(&mut p), Err(AddressError::InvalidLocalPart));
        let mut p = Cursor::new(b"a@\xc3");
        assert_eq!(parse_mailbox(&mut p), Err(AddressError::InvalidDomain));
    }

    #[test]
    fn display_requotes() {
        let cases = [
            (mb("a", "b"), "a@b"),
            (mb("a b", "d"), "\"a b\"@d"),
            (mb("a\"b\\c", "d"), "\"a\\\"b\\\\c\"@d"),
            (mb("", "d"), "\"\"@d"),
            (mb("a..b", "d"), "\"a..b\"@d"),
            (mb("josé", "exämple.de"), "josé@exämple.de"),
        ];
        for (m, s) in cases {
            assert_eq!(m.to_string(), s);
            assert_eq!(Mailbox::parse(s).as_ref(), Ok(&m), "round trip {s}");
        }
        assert_eq!(ReversePath::Null.to_string(), "<>");
        assert_eq!(ReversePath::Mailbox(mb("a", "b")).to_string(), "<a@b>");
        assert_eq!(ForwardPath::Postmaster.to_string(), "<Postmaster>");
    }

    #[test]
    fn helpers() {
        assert!(mb("a", "b").is_ascii());
        assert!(!mb("é", "b").is_ascii());
        assert!(!mb("a", "ü.de").is_ascii());
        assert_eq!(mb("a", "ExAmple.COM").domain_lowercase(), "example.com");
        assert_eq!(mb("a", "ÜBER.de").domain_lowercase(), "über.de");
        assert!(mb("a", "[192.0.2.1]").is_address_literal());
        assert!(ReversePath::Null.is_ascii());
        assert!(!ForwardPath::Mailbox(mb("é", "b")).is_ascii());
    }

    #[test]
    fn paths() {
        let r = PathKind::Reverse;
        let f = PathKind::Forward;
        assert_eq!(parse_path(b"<>", r), Ok((Path::Null, 2)));
        assert_eq!(parse_path(b"<>", f), Err(AddressError::NullNotAllowed));
        assert_eq!(parse_path(b"<PostMaster>", f), Ok((Path::Postmaster, 12)));
        assert_eq!(parse_path(b"<postmaster>", r), Err(AddressError::MissingAt));
        assert_eq!(
            parse_path(b"<postmaster@d> X", f),
            Ok((Path::Mailbox(mb("postmaster", "d")), 14))
        );
        assert_eq!(
            parse_path(b"<@a,@b.c:u@d>", f),
            Ok((Path::Mailbox(mb("u", "d")), 13))
        );
        assert_eq!(
            parse_path(b"<@a:u@d>", r),
            Ok((Path::Mailbox(mb("u", "d")), 8))
        );
        assert_eq!(
            parse_path(b"<@a,u@d>", r),
            Err(AddressError::InvalidSourceRoute)
        );
        assert_eq!(
            parse_path(b"<@:u@d>", r),
            Err(AddressError::InvalidSourceRoute)
        );
        assert_eq!(
            parse_path(b"<\"a>b\"@d>", r),
            Ok((Path::Mailbox(mb("a>b", "d")), 9))
        );
        assert_eq!(parse_path(b"a@d", r), Err(AddressError::MissingBrackets));
        assert_eq!(parse_path(b"<a@d", r), Err(AddressError::MissingBrackets));
        assert_eq!(parse_path(b"<a@d x>", r), Err(AddressError::InvalidDomain));
        let local = "a".repeat(64);
        let domain = format!(
            "{}.{}.{}.{}",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
            "e".repeat(60)
        );
        let exact = format!("<{local}@{}>", &domain[..189]);
        assert_eq!(exact.len(), 256);
        assert!(parse_path(exact.as_bytes(), r).is_ok());
        let over = format!("<{local}@{}>", &domain[..190]);
        assert_eq!(
            parse_path(over.as_bytes(), r),
            Err(AddressError::PathTooLong)
        );
    }
}
