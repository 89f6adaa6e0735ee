//! ESMTP parameters of MAIL FROM and RCPT TO (RFC 5321 §4.1.2, SIZE RFC 1870, BODY RFC 6152 /
//! RFC 3030, SMTPUTF8 RFC 6531, DSN RFC 3461, AUTH RFC 4954 §5).
//!
//! These types are also stored with the queued envelope, so they derive serde.

use serde::{Deserialize, Serialize};

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
