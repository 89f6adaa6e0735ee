//! One message to send ([`Transaction`]), what became of it ([`SendOutcome`]), and the plan
//! that turns a transaction into command lines for a given server, without I/O.
//!
//! The plan decides everything that can be decided before writing a byte (RFC 5321 §4.1.1.2,
//! §4.1.1.3 and the extensions): parameters only when the server offers their extension,
//! refusals that must not reach the wire (a size over the server's `SIZE`, `SMTPUTF8` or
//! `BINARYMIME` needed but not offered), and addresses re-serialized through
//! `mailroom_smtp::Mailbox` so that nothing but a well-formed path reaches the command line.

use mailroom_queue::Envelope;
use mailroom_smtp::{
    Body, EnhancedCode, MailParams, Mailbox, Notify, Orcpt, RcptParams, Reply, Ret, ReversePath,
    params::{MAX_ENVID_LEN, MAX_ORCPT_LEN},
    xtext,
};

use super::capabilities::Capabilities;
use super::data::{header_is_ascii, normalized_len};
use super::error::{ClientError, Missing, Peer, one_line};

/// A message to send: the envelope; the body is passed to
/// [`Connection::send`](super::Connection::send) separately.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    /// The reverse-path without angle brackets; `""` is the null sender `<>`.
    pub sender: String,
    /// The recipients, in order.
    pub recipients: Vec<RcptTo>,
    /// `BODY=` as received. `BINARYMIME` is sent with BDAT; the others with DATA.
    pub body_type: Option<Body>,
    /// The message was received with `SMTPUTF8`.
    pub smtputf8: bool,
    /// DSN `RET=` (relayed when the server offers DSN).
    pub ret: Option<Ret>,
    /// DSN `ENVID=`, xtext-decoded (relayed when the server offers DSN).
    pub envid: Option<String>,
}

/// One recipient of a [`Transaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    /// The forward-path without angle brackets.
    pub address: String,
    /// DSN `NOTIFY=` (relayed when the server offers DSN).
    pub notify: Option<Notify>,
    /// DSN `ORCPT=` (relayed when the server offers DSN).
    pub orcpt: Option<Orcpt>,
}

impl RcptTo {
    /// A recipient without DSN parameters.
    pub fn new(address: impl Into<String>) -> RcptTo {
        RcptTo {
            address: address.into(),
            notify: None,
            orcpt: None,
        }
    }
}

impl Transaction {
    /// A transaction from `sender` to `recipients`, without extension parameters.
    pub fn new<R: Into<String>>(
        sender: impl Into<String>,
        recipients: impl IntoIterator<Item = R>,
    ) -> Transaction {
        Transaction {
            sender: sender.into(),
            recipients: recipients
                .into_iter()
                .map(|r| RcptTo::new(r.into()))
                .collect(),
            ..Transaction::default()
        }
    }

    /// The transaction for the recipients of a queued envelope.
    pub fn from_envelope(envelope: &Envelope) -> Transaction {
        Transaction {
            sender: envelope.sender.clone(),
            recipients: envelope
                .recipients
                .iter()
                .map(|r| RcptTo {
                    address: r.address.clone(),
                    notify: r.notify,
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            body_type: envelope.body_type,
            smtputf8: envelope.smtputf8,
            ret: envelope.ret,
            envid: envelope.envid.clone(),
        }
    }
}

/// How a recipient fared, by the class of its deciding reply (RFC 5321 §4.2.1). The
/// worker's `outcome::RecipientOutcome::from_reply` makes the same split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyClass {
    /// 2xx: the server took responsibility for the message.
    Delivered,
    /// 4xx (or anything that is neither 2xx nor 5xx): try again later.
    Deferred,
    /// 5xx: bounce.
    Failed,
}

impl ReplyClass {
    /// The class of a reply code.
    pub fn of(reply: &Reply) -> ReplyClass {
        match reply.code {
            200..=299 => ReplyClass::Delivered,
            500..=599 => ReplyClass::Failed,
            _ => ReplyClass::Deferred,
        }
    }
}

/// What became of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    /// The address as given in the transaction.
    pub address: String,
    /// The reply to `RCPT TO`. For an address that does not parse, no command was sent and
    /// this is a locally made `553 5.1.3`.
    pub rcpt: Reply,
    /// The reply that decides: the RCPT reply when it was not 2xx, else the reply that ended
    /// the data (after the final dot or BDAT, or a refusal of DATA itself), which applies to
    /// every accepted recipient.
    pub reply: Reply,
}

impl RecipientResult {
    /// Delivered, deferred or failed, from [`RecipientResult::reply`].
    pub fn class(&self) -> ReplyClass {
        ReplyClass::of(&self.reply)
    }

    /// True when the server accepted the RCPT command.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.rcpt.code)
    }

    /// The deciding reply on one line for the delivery log and DSNs:
    /// `550 5.1.1 <x@example.com>: Recipient address rejected`.
    pub fn response(&self) -> String {
        one_line(&self.reply)
    }
}

/// The result of a transaction that got as far as the recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// The reply to `MAIL FROM` (always 2xx here: a refused MAIL is an error). `None` when no
    /// recipient address was usable, so nothing was sent.
    pub mail: Option<Reply>,
    /// One entry per recipient of the transaction, in its order.
    pub recipients: Vec<RecipientResult>,
    /// The reply that ended the data; `None` when no recipient was accepted (then neither
    /// DATA nor the body was sent, RFC 2920 §3.1).
    pub data: Option<Reply>,
}

impl SendOutcome {
    /// The recipients whose deciding reply is of `class`.
    pub fn with(&self, class: ReplyClass) -> impl Iterator<Item = &RecipientResult> {
        self.recipients.iter().filter(move |r| r.class() == class)
    }

    /// True when every recipient was delivered.
    pub fn all_delivered(&self) -> bool {
        self.recipients
            .iter()
            .all(|r| r.class() == ReplyClass::Delivered)
    }
}

/// A recipient as planned: its RCPT line, or the local refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PlannedRcpt {
    Send(String),
    Refused(Reply),
}

/// The commands for one transaction on one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) mail: String,
    pub(crate) rcpts: Vec<PlannedRcpt>,
    /// BDAT (BINARYMIME) instead of DATA.
    pub(crate) bdat: bool,
}

/// Plans `tx` with `body` for a server offering `caps`.
pub(crate) fn plan(
    tx: &Transaction,
    body: &[u8],
    caps: &Capabilities,
    peer: &Peer,
) -> Result<Plan, ClientError> {
    let sender =
        match tx.sender.as_str() {
            "" | "<>" => ReversePath::Null,
            s => ReversePath::Mailbox(Mailbox::parse(s).map_err(|error| {
                ClientError::InvalidSender {
                    address: tx.sender.clone(),
                    error,
                }
            })?),
        };
    let mailboxes: Vec<Result<Mailbox, Reply>> = tx
        .recipients
        .iter()
        .map(|r| {
            Mailbox::parse(&r.address).map_err(|e| {
                Reply::new(
                    553,
                    EnhancedCode(5, 1, 3),
                    format!("invalid recipient address (not sent): {e}"),
                )
            })
        })
        .collect();

    // RFC 6531 §3.2: a non-ASCII address needs SMTPUTF8; UTF-8 headers too (RFC 6532), but a
    // message flagged SMTPUTF8 whose header turns out ASCII can go without it.
    let utf8_address = !sender.is_ascii()
        || mailboxes
            .iter()
            .any(|m| m.as_ref().is_ok_and(|m| !m.is_ascii()));
    let utf8_headers = tx.smtputf8 && !header_is_ascii(body);
    let smtputf8 = utf8_address || utf8_headers;
    let missing = |missing| ClientError::Unsupported {
        peer: peer.clone(),
        missing,
    };
    if smtputf8 && !caps.smtputf8 {
        return Err(missing(if utf8_address {
            Missing::Smtputf8Address
        } else {
            Missing::Smtputf8Headers
        }));
    }

    let bdat = tx.body_type == Some(Body::BinaryMime);
    if bdat && !(caps.binary_mime && caps.chunking) {
        return Err(missing(Missing::BinaryMime));
    }
    let size = if bdat {
        u64::try_from(body.len()).unwrap_or(u64::MAX)
    } else {
        normalized_len(body)
    };
    if let Some(limit) = caps.max_size()
        && size > limit
    {
        return Err(ClientError::TooLarge {
            peer: peer.clone(),
            size,
            limit,
        });
    }

    // RFC 6152 §2: BODY= only to a server that offers 8BITMIME; an 8bit message goes to one
    // without it unchanged, as Postfix does (no 7bit downgrade).
    let body_param = match tx.body_type {
        Some(Body::BinaryMime) => Some(Body::BinaryMime),
        Some(b) if caps.eight_bit_mime => Some(b),
        _ => None,
    };
    let params = MailParams {
        size: caps.size.map(|_| size),
        body: body_param,
        smtputf8,
        ret: tx.ret.filter(|_| caps.dsn),
        envid: tx
            .envid
            .clone()
            .filter(|e| caps.dsn && xtext::encode(e).len() <= MAX_ENVID_LEN),
        auth: None,
    };
    let mail = format!("MAIL FROM:{sender}{params}");

    let rcpts = tx
        .recipients
        .iter()
        .zip(mailboxes)
        .map(|(r, m)| match m {
            Err(reply) => PlannedRcpt::Refused(reply),
            Ok(m) => {
                let params = if caps.dsn {
                    RcptParams {
                        notify: r.notify,
                        orcpt: r.orcpt.clone().filter(orcpt_is_sendable),
                    }
                } else {
                    RcptParams::default()
                };
                PlannedRcpt::Send(format!("RCPT TO:<{m}>{params}"))
            }
        })
        .collect();
    Ok(Plan { mail, rcpts, bdat })
}

/// An ORCPT that `RcptParams`' Display writes as a valid parameter: an atom address type and,
/// for `utf-8` (written without xtext, RFC 6533 §3), only characters allowed in an
/// esmtp-value. Anything else is dropped rather than put on the wire.
fn orcpt_is_sendable(orcpt: &Orcpt) -> bool {
    let type_ok = !orcpt.addr_type.is_empty()
        && orcpt
            .addr_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b));
    let value = if orcpt.addr_type.eq_ignore_ascii_case("utf-8") {
        if !orcpt
            .addr
            .bytes()
            .all(|b| matches!(b, 33..=60 | 62..=126 | 0x80..=0xff))
        {
            return false;
        }
        orcpt.addr.clone()
    } else {
        xtext::encode(&orcpt.addr)
    };
    type_ok && !orcpt.addr.is_empty() && orcpt.addr_type.len() + 1 + value.len() <= MAX_ORCPT_LEN
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn peer() -> Peer {
        Peer::new(SocketAddr::from(([127, 0, 0, 1], 25)), "mx.test")
    }

    fn caps(keywords: &str) -> Capabilities {
        Capabilities::from_ehlo(&Reply::plain(250, format!("mx.test\n{keywords}")))
    }

    fn dsn_tx() -> Transaction {
        Transaction {
            sender: "a@b.test".into(),
            recipients: vec![RcptTo {
                address: "c@d.test".into(),
                notify: Some(Notify {
                    success: true,
                    failure: true,
                    ..Notify::default()
                }),
                orcpt: Some(Orcpt {
                    addr_type: "rfc822".into(),
                    addr: "c+x@d.test".into(),
                }),
            }],
            body_type: Some(Body::EightBitMime),
            smtputf8: false,
            ret: Some(Ret::Hdrs),
            envid: Some("id 1".into()),
        }
    }

    #[test]
    fn parameters_follow_the_extensions() {
        let tx = dsn_tx();
        let body = b"Subject: x\r\n\r\nbody\n";
        let full = plan(&tx, body, &caps("SIZE 100\n8BITMIME\nDSN"), &peer()).expect("plan");
        assert_eq!(
            full.mail,
            "MAIL FROM:<a@b.test> SIZE=20 BODY=8BITMIME RET=HDRS ENVID=id+201"
        );
        assert_eq!(
            full.rcpts,
            vec![PlannedRcpt::Send(
                "RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.test".into()
            )]
        );
        assert!(!full.bdat);
        let bare = plan(&tx, body, &caps(""), &peer()).expect("plan");
        assert_eq!(bare.mail, "MAIL FROM:<a@b.test>");
        assert_eq!(
            bare.rcpts,
            vec![PlannedRcpt::Send("RCPT TO:<c@d.test>".into())]
        );
        let null = Transaction::new("", ["\"odd local\"@d.test"]);
        let p = plan(&null, b"", &caps("SIZE"), &peer()).expect("plan");
        assert_eq!(p.mail, "MAIL FROM:<> SIZE=0");
        assert_eq!(
            p.rcpts,
            vec![PlannedRcpt::Send("RCPT TO:<\"odd local\"@d.test>".into())]
        );
    }

    #[test]
    fn refusals_before_sending() {
        let tx = Transaction::new("a@b.test", ["c@d.test"]);
        let err = plan(&tx, &[b'x'; 200], &caps("SIZE 100"), &peer()).expect_err("too large");
        assert!(matches!(
            err,
            ClientError::TooLarge {
                size: 202,
                limit: 100,
                ..
            }
        ));

        let utf8 = Transaction::new("a@b.test", ["j\u{f6}rg@d.test"]);
        let err = plan(&utf8, b"", &caps("8BITMIME"), &peer()).expect_err("no SMTPUTF8");
        assert!(matches!(
            err,
            ClientError::Unsupported {
                missing: Missing::Smtputf8Address,
                ..
            }
        ));
        assert!(err.is_permanent());
        let p = plan(&utf8, b"", &caps("SMTPUTF8"), &peer()).expect("plan");
        assert_eq!(p.mail, "MAIL FROM:<a@b.test> SMTPUTF8");

        let mut headers = Transaction::new("a@b.test", ["c@d.test"]);
        headers.smtputf8 = true;
        let err = plan(
            &headers,
            "Subject: \u{e9}\r\n\r\n".as_bytes(),
            &caps(""),
            &peer(),
        )
        .expect_err("UTF-8 header");
        assert!(matches!(
            err,
            ClientError::Unsupported {
                missing: Missing::Smtputf8Headers,
                ..
            }
        ));
        let p = plan(
            &headers,
            b"Subject: ascii\r\n\r\n\xc3\xa9\r\n",
            &caps(""),
            &peer(),
        )
        .expect("ASCII header: SMTPUTF8 not needed");
        assert_eq!(p.mail, "MAIL FROM:<a@b.test>");

        let mut binary = Transaction::new("a@b.test", ["c@d.test"]);
        binary.body_type = Some(Body::BinaryMime);
        assert!(matches!(
            plan(&binary, b"\0", &caps("CHUNKING"), &peer()),
            Err(ClientError::Unsupported {
                missing: Missing::BinaryMime,
                ..
            })
        ));
        let p = plan(
            &binary,
            b"\0\n",
            &caps("CHUNKING\nBINARYMIME\nSIZE 10"),
            &peer(),
        )
        .expect("plan");
        assert!(p.bdat);
        assert_eq!(p.mail, "MAIL FROM:<a@b.test> SIZE=2 BODY=BINARYMIME");

        let bad_sender = Transaction::new("not an address", ["c@d.test"]);
        assert!(matches!(
            plan(&bad_sender, b"", &caps(""), &peer()),
            Err(ClientError::InvalidSender { .. })
        ));
    }

    #[test]
    fn invalid_recipients_and_parameters_stay_off_the_wire() {
        let mut tx = Transaction::new("a@b.test", ["c@d.test\r\nDATA", "ok@d.test"]);
        tx.recipients[1].orcpt = Some(Orcpt {
            addr_type: "utf-8".into(),
            addr: "x\r\nRSET".into(),
        });
        tx.envid = Some("x".repeat(101));
        let p = plan(&tx, b"", &caps("DSN"), &peer()).expect("plan");
        assert_eq!(p.mail, "MAIL FROM:<a@b.test>");
        assert!(matches!(&p.rcpts[0], PlannedRcpt::Refused(r) if r.code == 553));
        assert_eq!(p.rcpts[1], PlannedRcpt::Send("RCPT TO:<ok@d.test>".into()));
    }
}
