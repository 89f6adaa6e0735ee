//! The server's EHLO keywords (RFC 5321 §4.1.1.1, §2.2.2), parsed once per EHLO. After a HELO
//! fallback nothing is offered. Unknown keywords are ignored; odd values never fail.

use mailroom_smtp::Reply;

/// What the server offers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// True after EHLO, false after the HELO fallback.
    pub esmtp: bool,
    /// The first line of the EHLO/HELO reply (the server's name and greeting text).
    pub banner: String,
    /// `SIZE` (RFC 1870): `Some(limit)`, `Some(0)` when offered without a limit.
    pub size: Option<u64>,
    /// `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `CHUNKING` (RFC 3030).
    pub chunking: bool,
    /// `BINARYMIME` (RFC 3030).
    pub binary_mime: bool,
    /// `DSN` (RFC 3461).
    pub dsn: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034).
    pub enhanced_status_codes: bool,
    /// `AUTH` mechanisms (RFC 4954), upper-cased, also from the old `AUTH=` form.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Parses a positive EHLO reply: the first line is the greeting, each further line a
    /// keyword with optional parameters.
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            banner: reply.lines.first().cloned().unwrap_or_default(),
            ..Capabilities::default()
        };
        for line in reply.lines.iter().skip(1) {
            caps.add(line);
        }
        caps
    }

    /// After a positive HELO reply: no extensions.
    pub fn from_helo(reply: &Reply) -> Capabilities {
        Capabilities {
            banner: reply.lines.first().cloned().unwrap_or_default(),
            ..Capabilities::default()
        }
    }

    fn add(&mut self, line: &str) {
        let mut words = line.split_ascii_whitespace();
        let Some(keyword) = words.next() else {
            return;
        };
        let keyword = keyword.to_ascii_uppercase();
        // Old servers announce `AUTH=LOGIN PLAIN` (pre-RFC 4954 syntax).
        if let Some(first) = keyword.strip_prefix("AUTH=") {
            self.add_auth(std::iter::once(first).chain(words));
            return;
        }
        match keyword.as_str() {
            "SIZE" => {
                // A missing, zero or unparsable value means "no fixed limit" (RFC 1870 §4).
                let limit = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                self.size = Some(limit);
            }
            "PIPELINING" => self.pipelining = true,
            "8BITMIME" => self.eight_bit_mime = true,
            "SMTPUTF8" => self.smtputf8 = true,
            "STARTTLS" => self.starttls = true,
            "CHUNKING" => self.chunking = true,
            "BINARYMIME" => self.binary_mime = true,
            "DSN" => self.dsn = true,
            "ENHANCEDSTATUSCODES" => self.enhanced_status_codes = true,
            "AUTH" => self.add_auth(words),
            _ => {}
        }
    }

    fn add_auth<'a>(&mut self, mechanisms: impl Iterator<Item = &'a str>) {
        for m in mechanisms {
            let m = m.to_ascii_uppercase();
            if !m.is_empty() && !self.auth.contains(&m) {
                self.auth.push(m);
            }
        }
    }

    /// The server's size limit, when it announced one.
    pub fn max_size(&self) -> Option<u64> {
        self.size.filter(|&n| n > 0)
    }

    /// True when `mechanism` (upper case) is offered.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m == mechanism)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keywords() {
        let reply = Reply::plain(
            250,
            "mx.test Hello\nPIPELINING\nSIZE 10240000\n8bitmime\nSMTPUTF8\nSTARTTLS\nCHUNKING\n\
             BINARYMIME\nDSN\nENHANCEDSTATUSCODES\nAUTH PLAIN login\nAUTH=LOGIN XOAUTH2\nX-UNKNOWN a b\n",
        );
        let caps = Capabilities::from_ehlo(&reply);
        assert_eq!(
            caps,
            Capabilities {
                esmtp: true,
                banner: "mx.test Hello".into(),
                size: Some(10_240_000),
                pipelining: true,
                eight_bit_mime: true,
                smtputf8: true,
                starttls: true,
                chunking: true,
                binary_mime: true,
                dsn: true,
                enhanced_status_codes: true,
                auth: vec!["PLAIN".into(), "LOGIN".into(), "XOAUTH2".into()],
            }
        );
        assert_eq!(caps.max_size(), Some(10_240_000));
        assert!(caps.offers_auth("LOGIN"));
    }

    #[test]
    fn odd_values() {
        let cases = [
            ("x\nSIZE", Some(0), None),
            ("x\nSIZE 0", Some(0), None),
            ("x\nSIZE lots", Some(0), None),
            ("x\nSIZE 99999999999999999999999", Some(0), None),
            ("x\nSIZE 1000", Some(1000), Some(1000)),
            ("x", None, None),
        ];
        for (text, size, max) in cases {
            let caps = Capabilities::from_ehlo(&Reply::plain(250, text));
            assert_eq!((caps.size, caps.max_size()), (size, max), "{text:?}");
        }
        let helo = Capabilities::from_helo(&Reply::plain(250, "old.test\nPIPELINING"));
        assert!(!helo.esmtp && !helo.pipelining);
    }
}
