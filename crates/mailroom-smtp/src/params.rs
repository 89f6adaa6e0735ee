//! ESMTP parameters of MAIL FROM and RCPT TO (RFC 5321 §4.1.2, SIZE RFC 1870, BODY RFC 6152 /
//! RFC 3030, SMTPUTF8 RFC 6531, DSN RFC 3461, AUTH RFC 4954 §5).
//!
//! `command` parses the parameter list of MAIL/RCPT with the functions here; the values travel
//! with the envelope through the plugin hooks into the queue, so these types derive serde, and
//! come back out in the outbound client's MAIL/RCPT commands (DSN parameters are relayed,
//! RFC 3461 §5.2).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{CommandError, CommandErrorKind};
use crate::xtext;

/// `BODY=` of MAIL FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Body {
    /// `BODY=7BIT`
    #[serde(rename = "7BIT")]
    SevenBit,
    /// `BODY=8BITMIME` (RFC 6152)
    #[serde(rename = "8BITMIME")]
    EightBitMime,
    /// `BODY=BINARYMIME` (RFC 3030, only with BDAT)
    #[serde(rename = "BINARYMIME")]
    BinaryMime,
}

/// `RET=` of MAIL FROM (RFC 3461 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Ret {
    /// Return the full message in a DSN.
    Full,
    /// Return only the headers.
    Hdrs,
}

/// `NOTIFY=` of RCPT TO (RFC 3461 §4.1). `never` excludes the other three.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// `NEVER`
    pub never: bool,
    /// `SUCCESS`
    pub success: bool,
    /// `FAILURE`
    pub failure: bool,
    /// `DELAY`
    pub delay: bool,
}

/// `ORCPT=` of RCPT TO (RFC 3461 §4.2): address type and the xtext-decoded address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orcpt {
    /// Address type, usually `rfc822` (case preserved as sent).
    pub addr_type: String,
    /// The original recipient, xtext-decoded.
    pub addr: String,
}

/// Parameters of `MAIL FROM:<...> params`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    /// `SIZE=` declared message size in octets.
    pub size: Option<u64>,
    /// `BODY=`
    pub body: Option<Body>,
    /// `SMTPUTF8`
    pub smtputf8: bool,
    /// `RET=`
    pub ret: Option<Ret>,
    /// `ENVID=` (xtext-decoded)
    pub envid: Option<String>,
    /// `AUTH=` (xtext-decoded; `<>` kept as `"<>"`)
    pub auth: Option<String>,
}

/// Parameters of `RCPT TO:<...> params`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptParams {
    /// `NOTIFY=`
    pub notify: Option<Notify>,
    /// `ORCPT=`
    pub orcpt: Option<Orcpt>,
}

impl Body {
    /// The keyword as written in `BODY=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Body::SevenBit => "7BIT",
            Body::EightBitMime => "8BITMIME",
            Body::BinaryMime => "BINARYMIME",
        }
    }
}

impl Ret {
    /// The keyword as written in `RET=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

impl fmt::Display for MailParams {
    /// The parameters as an SMTP client writes them after `MAIL FROM:<...>`, each preceded by a
    /// space (empty when there are none); `ENVID` and `AUTH` are xtext-encoded again.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(size) = self.size {
            write!(f, " SIZE={size}")?;
        }
        if let Some(body) = self.body {
            write!(f, " BODY={}", body.as_str())?;
        }
        if self.smtputf8 {
            f.write_str(" SMTPUTF8")?;
        }
        if let Some(ret) = self.ret {
            write!(f, " RET={}", ret.as_str())?;
        }
        if let Some(envid) = &self.envid {
            write!(f, " ENVID={}", xtext::encode(envid))?;
        }
        match self.auth.as_deref() {
            Some("<>") => f.write_str(" AUTH=<>")?,
            Some(auth) => write!(f, " AUTH={}", xtext::encode(auth))?,
            None => {}
        }
        Ok(())
    }
}

impl fmt::Display for Notify {
    /// `NEVER` or the comma list, as in `NOTIFY=` (RFC 3461 §4.1).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.never {
            return f.write_str("NEVER");
        }
        let items = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ];
        let mut first = true;
        for (_, name) in items.iter().filter(|(on, _)| *on) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

impl fmt::Display for RcptParams {
    /// The parameters as an SMTP client writes them after `RCPT TO:<...>`, each preceded by a
    /// space; the ORCPT address is xtext-encoded again (kept as is for `utf-8`, RFC 6533 §3).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(notify) = self.notify
            && (notify.never || notify.success || notify.failure || notify.delay)
        {
            write!(f, " NOTIFY={notify}")?;
        }
        if let Some(orcpt) = &self.orcpt {
            if orcpt.addr_type.eq_ignore_ascii_case("utf-8") {
                write!(f, " ORCPT={};{}", orcpt.addr_type, orcpt.addr)?;
            } else {
                write!(
                    f,
                    " ORCPT={};{}",
                    orcpt.addr_type,
                    xtext::encode(&orcpt.addr)
                )?;
            }
        }
        Ok(())
    }
}

/// Longest `ENVID=` value, xtext-encoded (RFC 3461 §4.4).
pub const MAX_ENVID_LEN: usize = 100;
/// Longest `ORCPT=` value, xtext-encoded (RFC 3461 §4.2).
pub const MAX_ORCPT_LEN: usize = 500;

/// Splits one `esmtp-param = esmtp-keyword ["=" esmtp-value]` (RFC 5321 §4.1.2, values extended
/// to UTF-8 by RFC 6531 §3.3) into the upper-cased keyword and the value.
fn split_param(param: &str) -> Result<(String, Option<&str>), CommandError> {
    let (keyword, value) = match param.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (param, None),
    };
    // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
    let keyword_ok = keyword
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && keyword
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !keyword_ok {
        return Err(invalid("Syntax error in parameter keyword"));
    }
    // esmtp-value = 1*(%d33-60 / %d62-126 / UTF8-non-ascii)
    if let Some(v) = value
        && (v.is_empty()
            || !v
                .bytes()
                .all(|b| matches!(b, 33..=60 | 62..=126 | 0x80..=0xff)))
    {
        return Err(invalid(&format!(
            "Syntax error in the value of {}",
            keyword.to_ascii_uppercase()
        )));
    }
    Ok((keyword.to_ascii_uppercase(), value))
}

fn invalid(message: &str) -> CommandError {
    CommandError::new(CommandErrorKind::InvalidParameter, message)
}

fn unsupported(keyword: &str) -> CommandError {
    CommandError::new(
        CommandErrorKind::UnknownParameter,
        format!("Unsupported parameter {keyword}"),
    )
}

/// Keeps track of keywords seen: a parameter given twice is a syntax error (501).
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn check(&mut self, keyword: &str) -> Result<(), CommandError> {
        if self.0.iter().any(|k| k == keyword) {
            return Err(invalid(&format!("Duplicate parameter {keyword}")));
        }
        self.0.push(keyword.to_owned());
        Ok(())
    }
}

fn required<'a>(keyword: &str, value: Option<&'a str>) -> Result<&'a str, CommandError> {
    value.ok_or_else(|| invalid(&format!("{keyword} requires a value")))
}

/// Parses the parameters of `MAIL FROM` (already split at spaces). Unknown keywords are
/// `555 5.5.4` (RFC 5321 §4.1.1.11), bad or repeated values `501 5.5.4`.
pub(crate) fn parse_mail_params<'a>(
    list: impl Iterator<Item = &'a str>,
) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    let mut seen = Seen::default();
    for param in list {
        let (keyword, value) = split_param(param)?;
        seen.check(&keyword)?;
        match keyword.as_str() {
            // RFC 1870 §3: size-value = 1*20DIGIT. A value beyond u64 saturates, so the server
            // answers it like any other oversized declaration (552).
            "SIZE" => {
                let v = required(&keyword, value)?;
                if !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid("Syntax: SIZE=<digits>"));
                }
                params.size = Some(crate::command::parse_digits(v).unwrap_or(u64::MAX));
            }
            // RFC 6152 §2, RFC 3030 §3
            "BODY" => {
                let v = required(&keyword, value)?;
                params.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    "BINARYMIME" => Body::BinaryMime,
                    _ => return Err(invalid("Syntax: BODY=7BIT|8BITMIME|BINARYMIME")),
                });
            }
            // RFC 6531 §3.4: no value
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(invalid("SMTPUTF8 takes no value"));
                }
                params.smtputf8 = true;
            }
            // RFC 3461 §4.3
            "RET" => {
                let v = required(&keyword, value)?;
                params.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(invalid("Syntax: RET=FULL|HDRS")),
                });
            }
            // RFC 3461 §4.4
            "ENVID" => {
                let v = required(&keyword, value)?;
                if v.len() > MAX_ENVID_LEN {
                    return Err(invalid("ENVID longer than 100 characters"));
                }
                params.envid =
                    Some(xtext::decode(v).map_err(|e| invalid(&format!("Invalid ENVID: {e}")))?);
            }
            // RFC 4954 §5: AUTH=<> or the xtext-encoded authorized identity
            "AUTH" => {
                let v = required(&keyword, value)?;
                let decoded = if v == "<>" {
                    v.to_owned()
                } else {
                    xtext::decode(v).map_err(|e| invalid(&format!("Invalid AUTH: {e}")))?
                };
                params.auth = Some(decoded);
            }
            _ => return Err(unsupported(&keyword)),
        }
    }
    Ok(params)
}

/// Parses the parameters of `RCPT TO` (already split at spaces).
pub(crate) fn parse_rcpt_params<'a>(
    list: impl Iterator<Item = &'a str>,
) -> Result<RcptParams, CommandError> {
    let mut params = RcptParams::default();
    let mut seen = Seen::default();
    for param in list {
        let (keyword, value) = split_param(param)?;
        seen.check(&keyword)?;
        match keyword.as_str() {
            "NOTIFY" => params.notify = Some(parse_notify(required(&keyword, value)?)?),
            "ORCPT" => params.orcpt = Some(parse_orcpt(required(&keyword, value)?)?),
            _ => return Err(unsupported(&keyword)),
        }
    }
    Ok(params)
}

/// `NOTIFY=NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY` (RFC 3461 §4.1); `NEVER`
/// combined with anything is an error.
fn parse_notify(value: &str) -> Result<Notify, CommandError> {
    const USAGE: &str = "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY";
    let mut notify = Notify::default();
    let mut count = 0;
    for item in value.split(',') {
        count += 1;
        match item.to_ascii_uppercase().as_str() {
            "NEVER" => notify.never = true,
            "SUCCESS" => notify.success = true,
            "FAILURE" => notify.failure = true,
            "DELAY" => notify.delay = true,
            _ => return Err(invalid(USAGE)),
        }
    }
    if notify.never && count > 1 {
        return Err(invalid(USAGE));
    }
    Ok(notify)
}

/// `ORCPT=addr-type ";" xtext` (RFC 3461 §4.2). For `utf-8` addresses (RFC 6533 §3) the value is
/// kept as sent, since it uses its own `\x{..}` escapes rather than xtext.
fn parse_orcpt(value: &str) -> Result<Orcpt, CommandError> {
    const USAGE: &str = "Syntax: ORCPT=addr-type;address";
    if value.len() > MAX_ORCPT_LEN {
        return Err(invalid("ORCPT longer than 500 characters"));
    }
    let (addr_type, addr) = value.split_once(';').ok_or_else(|| invalid(USAGE))?;
    // addr-type = atom (RFC 3461 §4.2)
    let type_ok = !addr_type.is_empty()
        && addr_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b));
    if !type_ok || addr.is_empty() {
        return Err(invalid(USAGE));
    }
    let addr = if addr_type.eq_ignore_ascii_case("utf-8") {
        addr.to_owned()
    } else {
        xtext::decode(addr).map_err(|e| invalid(&format!("Invalid ORCPT: {e}")))?
    };
    Ok(Orcpt {
        addr_type: addr_type.to_owned(),
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        let mail = MailParams {
            size: Some(12),
            body: Some(Body::EightBitMime),
            smtputf8: true,
            ret: Some(Ret::Hdrs),
            envid: Some("a+b=c d".into()),
            auth: Some("<>".into()),
        };
        let wire = mail.to_string();
        assert_eq!(
            wire,
            " SIZE=12 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=a+2Bb+3Dc+20d AUTH=<>"
        );
        assert_eq!(
            parse_mail_params(wire.split(' ').filter(|p| !p.is_empty())),
            Ok(mail)
        );
        assert_eq!(MailParams::default().to_string(), "");

        let rcpt = RcptParams {
            notify: Some(Notify {
                never: false,
                success: true,
                failure: false,
                delay: true,
            }),
            orcpt: Some(Orcpt {
                addr_type: "rfc822".into(),
                addr: "a+b@c".into(),
            }),
        };
        let wire = rcpt.to_string();
        assert_eq!(wire, " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb@c");
        assert_eq!(
            parse_rcpt_params(wire.split(' ').filter(|p| !p.is_empty())),
            Ok(rcpt)
        );
        let never = Notify {
            never: true,
            ..Notify::default()
        };
        assert_eq!(never.to_string(), "NEVER");
    }
}
