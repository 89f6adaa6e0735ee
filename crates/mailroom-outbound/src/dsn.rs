//! Delivery status notifications (DSNs): the report a delivery worker queues for the envelope
//! sender when recipients failed, are delayed, or (on request) were delivered.
//!
//! Flow: the worker collects one [`RecipientReport`] per recipient outcome and calls [`build`]
//! with the original envelope and message. [`build`] keeps the reports the recipient's `NOTIFY=`
//! asks for ([`should_notify`], RFC 3461 §4.1), refuses to answer the null reverse-path (never
//! bounce a bounce, RFC 5321 §4.5.5 and §6.1), and writes a `multipart/report` (RFC 6522) with
//! three parts:
//!
//! 1. `text/plain`: the explanation for humans (reporting MTA, each recipient, the remote reply);
//! 2. `message/delivery-status` (RFC 3464 §2): per-message fields, then one block per recipient;
//! 3. the returned message: `message/rfc822` for `RET=FULL` or no `RET`, the header section alone
//!    as `text/rfc822-headers` (RFC 6522 §4) for `RET=HDRS`, for a message larger than
//!    [`DsnInput::max_returned_body`], and for delay and success reports (RFC 3461 §4.3 asks for
//!    the full message only in "failed" DSNs).
//!
//! When a recipient address, an `ORCPT=` address or the returned header section is not ASCII,
//! the report is internationalized (RFC 6533): `message/global-delivery-status` with `utf-8`
//! address types, and `message/global` / `message/global-headers` (RFC 6532 §3.7-3.8) for the
//! returned content.
//!
//! The caller queues [`Dsn::message`] with `MAIL FROM:<>` to [`Dsn::recipient`]. Everything here
//! is pure: the clock comes in through [`DsnInput::now_ms`], nothing is read or written. Text that
//! others control (the remote server's reply, addresses, `ENVID=`) is sanitized before it is
//! written: control characters (CR, LF, NUL, ...) become spaces, so it can never start a header
//! line or a MIME part, and every line written is folded to at most 998 octets (RFC 5322 §2.1.1).

use base64::Engine as _;
use chrono::{DateTime, Utc};
use mailroom_queue::{Envelope, Recipient};
use mailroom_smtp::{Body, EnhancedCode, Ret};

/// Longest line we write, without its CRLF (RFC 5322 §2.1.1).
const MAX_LINE: usize = 998;
/// Where header fields are folded and text is wrapped when the words allow (RFC 5322 §2.1.1).
const FOLD_AT: usize = 78;
/// Longest remote reply kept in a report, in characters (a reply parsed by the client is
/// bounded anyway; this keeps one report readable).
const MAX_DIAGNOSTIC_CHARS: usize = 2000;
/// Longest address, host name or envelope id kept, in characters.
const MAX_VALUE_CHARS: usize = 1000;
/// Length of a base64 line (RFC 2045 §6.8).
const BASE64_LINE: usize = 76;
/// Boundaries tried before giving up on finding one absent from the content.
const BOUNDARY_TRIES: usize = 16;

/// The `Action` of one recipient (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Delivery failed permanently; the message will not be retried for this recipient.
    Failed,
    /// Delivery has not succeeded yet and will be retried.
    Delayed,
    /// Delivered to the recipient's mailbox (or to the final MTA that took responsibility).
    Delivered,
    /// Relayed to a system that does not send DSNs (RFC 3461 §6.2.2).
    Relayed,
    /// Delivered to a list or alias that forwards to other addresses.
    Expanded,
}

impl Action {
    /// The value as written in the `Action` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }

    /// The generic status code of this action, used when a report carries an invalid one.
    fn default_status(self) -> EnhancedCode {
        match self {
            Action::Failed => EnhancedCode(5, 0, 0),
            Action::Delayed => EnhancedCode(4, 0, 0),
            Action::Delivered | Action::Relayed | Action::Expanded => EnhancedCode(2, 0, 0),
        }
    }
}

/// The outcome of one recipient of the original envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReport {
    /// The recipient as queued, with its `NOTIFY=` and `ORCPT=`.
    pub recipient: Recipient,
    /// What happened.
    pub action: Action,
    /// The enhanced status code (RFC 3463) `(class, subject, detail)`, e.g. `(5, 1, 1)`; a class
    /// other than 2, 4 or 5 is replaced by the action's generic code (`5.0.0`, `4.0.0`,
    /// `2.0.0`). The class need not match the action: an expired message is `failed` with
    /// `4.4.7`.
    pub status: (u8, u16, u16),
    /// The host name of the remote MTA that answered, if any.
    pub remote_mta: Option<String>,
    /// The remote reply, e.g. `550 5.1.1 <x@y>: user unknown`; the lines of a multi-line reply
    /// may be joined with `\n`. Sanitized before it is written.
    pub diagnostic: Option<String>,
    /// When delivery was last attempted, Unix milliseconds.
    pub last_attempt_ms: Option<u64>,
    /// For [`Action::Delayed`]: when the queue gives up, Unix milliseconds.
    pub will_retry_until_ms: Option<u64>,
}

/// Everything [`build`] needs: the original envelope and message, the reports and our identity.
#[derive(Debug, Clone, Copy)]
pub struct DsnInput<'a> {
    /// Our host name, for `Reporting-MTA` and the text.
    pub reporting_mta: &'a str,
    /// The `From` address of the report, e.g. `MAILER-DAEMON@mx.example.net`.
    pub from: &'a str,
    /// The original envelope.
    pub envelope: &'a Envelope,
    /// The original message as queued (CRLF line endings).
    pub original: &'a [u8],
    /// The recipient outcomes; those the recipient did not ask for are left out.
    pub reports: &'a [RecipientReport],
    /// When the original message arrived, Unix milliseconds (`Arrival-Date`).
    pub arrival_ms: u64,
    /// Now, Unix milliseconds (`Date`, `Message-ID`).
    pub now_ms: u64,
    /// The domain of the report's `Message-ID`.
    pub message_id_domain: &'a str,
    /// The full message is returned only up to this many octets, else its header section only.
    pub max_returned_body: usize,
}

/// A report ready to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    /// The reverse-path: always `""`, DSNs are sent with `MAIL FROM:<>` (RFC 3461 §6.2,
    /// RFC 5321 §4.5.5).
    pub sender: String,
    /// The single recipient: the original envelope sender.
    pub recipient: String,
    /// The complete message, CRLF line endings, no line longer than 998 octets.
    pub message: Vec<u8>,
    /// The report's header section is not ASCII (the original sender's address is not), so it
    /// must be sent with `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `7BIT`, or `8BITMIME` when the message contains 8-bit octets.
    pub body: Body,
}

/// Whether `recipient` asked for a DSN with this action (RFC 3461 §4.1): `NOTIFY=NEVER` never;
/// an explicit `NOTIFY` list only for the listed conditions (`FAILURE` for failed, `DELAY` for
/// delayed, `SUCCESS` for delivered, relayed and expanded); without `NOTIFY`, failures and
/// delays (RFC 3461 §4.1 leaves delays to the MTA) but no success.
pub fn should_notify(recipient: &Recipient, action: Action) -> bool {
    match recipient.notify {
        Some(notify) if notify.never => false,
        Some(notify) => match action {
            Action::Failed => notify.failure,
            Action::Delayed => notify.delay,
            Action::Delivered | Action::Relayed | Action::Expanded => notify.success,
        },
        None => matches!(action, Action::Failed | Action::Delayed),
    }
}

/// Builds the DSN for the reports the recipients asked for. `None` when the original sender is
/// the null reverse-path (a DSN is never sent about a DSN) or when no report is wanted.
pub fn build(input: &DsnInput<'_>) -> Option<Dsn> {
    build_with(input, &mut || {
        ulid::Ulid::from_parts(input.now_ms, rand::random::<u128>()).to_string()
    })
}

/// [`build`] with the source of unique tokens (`Message-ID` and boundary) passed in.
fn build_with(input: &DsnInput<'_>, token: &mut dyn FnMut() -> String) -> Option<Dsn> {
    let sender = &input.envelope.sender;
    if sender.is_empty() {
        return None;
    }
    let reports: Vec<&RecipientReport> = input
        .reports
        .iter()
        .filter(|r| should_notify(&r.recipient, r.action))
        .collect();
    if reports.is_empty() {
        return None;
    }
    let global = needs_global(input, &reports);
    let failure = reports.iter().any(|r| r.action == Action::Failed);
    let returned = returned_content(input, global, failure);
    let human = human_text(input, &reports, &returned, global);
    let status = delivery_status(input, &reports, global);

    let parts = [
        Part {
            content_type: if human.is_ascii() {
                "text/plain; charset=us-ascii"
            } else {
                "text/plain; charset=utf-8"
            },
            description: "Notification",
            transfer: Transfer::of(human.as_bytes()),
            body: human.as_bytes(),
        },
        Part {
            content_type: if global {
                "message/global-delivery-status"
            } else {
                "message/delivery-status"
            },
            description: "Delivery report",
            transfer: Transfer::of(status.as_bytes()),
            body: status.as_bytes(),
        },
        Part {
            content_type: returned.content_type,
            description: returned.description,
            transfer: returned.transfer,
            body: &returned.body,
        },
    ];
    let contents: Vec<&[u8]> = parts
        .iter()
        .map(|p| p.body)
        .chain([input.original])
        .collect();
    let boundary = choose_boundary(&contents, || format!("=_mailroom_{}", token()));
    let shell = Shell {
        boundary: &boundary,
        message_id: &token(),
        global,
        eight_bit: parts.iter().any(|p| !p.body.is_ascii()),
    };
    let head = top_header(input, &reports, &shell);
    let message = assemble(&head, &boundary, &parts);
    let body = if message.is_ascii() {
        Body::SevenBit
    } else {
        Body::EightBitMime
    };
    Some(Dsn {
        sender: String::new(),
        recipient: sender.clone(),
        message,
        smtputf8: !sender.is_ascii(),
        body,
    })
}

/// What the top-level header section needs besides the input.
struct Shell<'a> {
    boundary: &'a str,
    /// The unique left-hand side of the `Message-ID`.
    message_id: &'a str,
    global: bool,
    eight_bit: bool,
}

/// The report's own header section (RFC 5322 §3.6, RFC 3834 §5 `Auto-Submitted`, RFC 6522 §3
/// `multipart/report`), without the empty line that ends it.
fn top_header(input: &DsnInput<'_>, reports: &[&RecipientReport], shell: &Shell<'_>) -> String {
    let domain = Some(clean_host(input.message_id_domain))
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| reporting_host(input));
    let from = clean_address(input.from, false);
    let to = clean_address(&input.envelope.sender, true);
    let report_type = if shell.global {
        "global-delivery-status"
    } else {
        "delivery-status"
    };
    let mut head = String::new();
    push_field(&mut head, "From", &format!("Mail Delivery System <{from}>"));
    push_field(&mut head, "To", &format!("<{to}>"));
    push_field(&mut head, "Subject", subject(reports));
    push_field(&mut head, "Date", &rfc5322_date(input.now_ms));
    push_field(
        &mut head,
        "Message-ID",
        &format!("<{}@{domain}>", shell.message_id),
    );
    push_field(&mut head, "Auto-Submitted", "auto-replied");
    push_field(&mut head, "MIME-Version", "1.0");
    push_field(
        &mut head,
        "Content-Type",
        &format!(
            "multipart/report; report-type={report_type}; boundary=\"{}\"",
            shell.boundary
        ),
    );
    if shell.eight_bit {
        push_field(&mut head, "Content-Transfer-Encoding", "8bit");
    }
    head
}

/// Whether the report must use the RFC 6533 types: a recipient or original-recipient address,
/// or the returned header section, is not ASCII.
fn needs_global(input: &DsnInput<'_>, reports: &[&RecipientReport]) -> bool {
    let address_not_ascii = reports.iter().any(|r| {
        !r.recipient.address.is_ascii()
            || r.recipient
                .orcpt
                .as_ref()
                .is_some_and(|o| !o.addr.is_ascii() || !o.addr_type.is_ascii())
    });
    address_not_ascii || !header_section(input.original).is_ascii()
}

/// The `Subject`, by the most important action present.
fn subject(reports: &[&RecipientReport]) -> &'static str {
    if reports.iter().any(|r| r.action == Action::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if reports.iter().any(|r| r.action == Action::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: the explanation for humans.

/// The `text/plain` part: who reports, then one paragraph per action with its recipients, then
/// what is attached.
fn human_text(
    input: &DsnInput<'_>,
    reports: &[&RecipientReport],
    returned: &Returned,
    utf8: bool,
) -> String {
    let host = reporting_host(input);
    let mut out = String::new();
    push_paragraph(
        &mut out,
        &format!("This is the mail system at host {host}."),
    );
    out.push_str("\r\n");
    let groups = [
        (
            Action::Failed,
            "Your message could not be delivered to the recipients below. This is a \
             permanent error: the mail system has given up on them.",
        ),
        (
            Action::Delayed,
            "Your message has not been delivered yet to the recipients below. The mail \
             system will keep trying; you do not need to send it again.",
        ),
        (
            Action::Delivered,
            "Your message was delivered to the recipients below, as you asked in your \
             delivery notification request.",
        ),
        (
            Action::Relayed,
            "Your message was passed on for the recipients below to a mail system that \
             does not send delivery notifications; you may hear nothing more about them.",
        ),
        (
            Action::Expanded,
            "Your message was delivered to the recipients below, which are lists or \
             aliases that forward it to other addresses.",
        ),
    ];
    for (action, intro) in groups {
        let group: Vec<&&RecipientReport> = reports.iter().filter(|r| r.action == action).collect();
        if group.is_empty() {
            continue;
        }
        push_paragraph(&mut out, intro);
        out.push_str("\r\n");
        for report in group {
            push_recipient_text(&mut out, report, utf8);
            out.push_str("\r\n");
        }
    }
    push_paragraph(&mut out, returned.note(input.max_returned_body).as_str());
    out.push_str("\r\n");
    push_paragraph(
        &mut out,
        &format!("If you need help, write to the postmaster of {host} and include this report."),
    );
    out
}

/// One recipient in the text part: the address, then indented details.
fn push_recipient_text(out: &mut String, report: &RecipientReport, utf8: bool) {
    let address = clean_address(&report.recipient.address, utf8);
    push_wrapped(out, "", "", &format!("<{address}>"));
    let indent = "    ";
    let status = valid_status(report);
    push_wrapped(out, indent, indent, &format!("Status: {status}"));
    if let Some(orcpt) = &report.recipient.orcpt {
        let decoded = if utf8 && orcpt.addr_type.eq_ignore_ascii_case("utf-8") {
            decode_utf8_escapes(&orcpt.addr)
        } else {
            None
        };
        let original = clean_address(decoded.as_deref().unwrap_or(&orcpt.addr), utf8);
        if !original.is_empty() && original != address {
            push_wrapped(
                out,
                indent,
                indent,
                &format!("Originally addressed to: {original}"),
            );
        }
    }
    if let Some(host) = remote_host(report) {
        push_wrapped(out, indent, indent, &format!("Remote server: {host}"));
    }
    if let Some(diagnostic) = diagnostic_text(report, utf8) {
        let label = if is_smtp_reply(&diagnostic) {
            "The server replied"
        } else {
            "Reason"
        };
        push_wrapped(out, indent, "      ", &format!("{label}: {diagnostic}"));
    }
    if let Some(ms) = report.last_attempt_ms {
        push_wrapped(
            out,
            indent,
            indent,
            &format!("Last attempt: {}", rfc5322_date(ms)),
        );
    }
    if report.action == Action::Delayed
        && let Some(ms) = report.will_retry_until_ms
    {
        push_wrapped(
            out,
            indent,
            indent,
            &format!("Will retry until: {}", rfc5322_date(ms)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: the machine-readable report (RFC 3464 §2.2, §2.3).

/// The `message/delivery-status` content: per-message fields, then a blank line before each
/// recipient's fields (RFC 3464 §2.1).
fn delivery_status(input: &DsnInput<'_>, reports: &[&RecipientReport], global: bool) -> String {
    let mut out = String::new();
    if let Some(envid) = &input.envelope.envid {
        push_field(&mut out, "Original-Envelope-Id", &envelope_id(envid));
    }
    push_field(
        &mut out,
        "Reporting-MTA",
        &format!("dns; {}", reporting_host(input)),
    );
    push_field(
        &mut out,
        "X-Mailroom-Queue-ID",
        &input.envelope.id.to_string(),
    );
    push_field(&mut out, "Arrival-Date", &rfc5322_date(input.arrival_ms));
    for report in reports {
        out.push_str("\r\n");
        let recipient = &report.recipient;
        if let Some(orcpt) = &recipient.orcpt {
            push_field(
                &mut out,
                "Original-Recipient",
                &original_recipient(orcpt, global),
            );
        }
        push_field(
            &mut out,
            "Final-Recipient",
            &final_recipient(&recipient.address, global),
        );
        push_field(&mut out, "Action", report.action.as_str());
        push_field(&mut out, "Status", &valid_status(report).to_string());
        if let Some(host) = remote_host(report) {
            push_field(&mut out, "Remote-MTA", &format!("dns; {host}"));
        }
        if let Some(diagnostic) = diagnostic_text(report, global) {
            push_field(
                &mut out,
                "Diagnostic-Code",
                &format!("{}; {diagnostic}", diagnostic_type(&diagnostic)),
            );
        }
        if let Some(ms) = report.last_attempt_ms {
            push_field(&mut out, "Last-Attempt-Date", &rfc5322_date(ms));
        }
        if report.action == Action::Delayed
            && let Some(ms) = report.will_retry_until_ms
        {
            push_field(&mut out, "Will-Retry-Until", &rfc5322_date(ms));
        }
    }
    out
}

/// The status code of a report, or the action's generic one when the class is not 2, 4 or 5
/// or a number has more than three digits (RFC 3464 §2.3.4, RFC 3463 §2).
fn valid_status(report: &RecipientReport) -> EnhancedCode {
    let (class, subject, detail) = report.status;
    if matches!(class, 2 | 4 | 5) && subject <= 999 && detail <= 999 {
        EnhancedCode(class, subject, detail)
    } else {
        report.action.default_status()
    }
}

/// The remote MTA's host name, if known and non-empty after cleaning.
fn remote_host(report: &RecipientReport) -> Option<String> {
    report
        .remote_mta
        .as_deref()
        .map(clean_host)
        .filter(|h| !h.is_empty())
}

/// The remote reply, sanitized (a remote server controls it), if non-empty.
fn diagnostic_text(report: &RecipientReport, utf8: bool) -> Option<String> {
    report
        .diagnostic
        .as_deref()
        .map(|d| clean_text(d, utf8, MAX_DIAGNOSTIC_CHARS))
        .filter(|d| !d.is_empty())
}

/// The `diagnostic-type` of a Diagnostic-Code (RFC 3464 §2.3.6): `smtp` for a remote reply
/// (it starts with a reply code, RFC 5321 §4.2), else `X-Mailroom` for our own explanation
/// (a connection error, a timeout).
fn diagnostic_type(diagnostic: &str) -> &'static str {
    if is_smtp_reply(diagnostic) {
        "smtp"
    } else {
        "X-Mailroom"
    }
}

/// Whether `text` starts like an SMTP reply: a code 200..=599, then the end, a space or `-`.
fn is_smtp_reply(text: &str) -> bool {
    let b = text.as_bytes();
    let code = matches!(b.first(), Some(b'2'..=b'5'))
        && b.get(1).is_some_and(u8::is_ascii_digit)
        && b.get(2).is_some_and(u8::is_ascii_digit);
    code && matches!(b.get(3), None | Some(b' ' | b'-'))
}

/// The `Original-Envelope-Id` value (RFC 3464 §2.2.1: the envelope id as the sender gave it).
/// The envelope keeps the xtext-decoded `ENVID`; it is written decoded when that is printable
/// ASCII without leading, trailing or repeated spaces, otherwise in its xtext form (RFC 3461
/// §4.4), which is ASCII and loses nothing.
fn envelope_id(envid: &str) -> String {
    let printable = envid.bytes().all(|b| (0x20..0x7f).contains(&b));
    if printable && clean_text(envid, false, MAX_VALUE_CHARS) == envid {
        envid.to_owned()
    } else {
        mailroom_smtp::xtext::encode(envid)
    }
}

/// `Final-Recipient: rfc822; addr`, or `utf-8; addr` for a non-ASCII address (RFC 6533 §3).
fn final_recipient(address: &str, global: bool) -> String {
    let address = clean_address(address, global);
    if address.is_ascii() {
        format!("rfc822; {address}")
    } else {
        format!("utf-8; {address}")
    }
}

/// The `Original-Recipient` value from `ORCPT=` (RFC 3464 §2.3.1, RFC 3461 §4.2): the address
/// type as given and the decoded address. A `utf-8` address (kept as sent, RFC 6533 §3) has its
/// `\x{HEX}` escapes decoded in a global report; a non-ASCII `rfc822` address becomes `utf-8`;
/// anything that is still not representable is written as xtext.
fn original_recipient(orcpt: &mailroom_smtp::Orcpt, global: bool) -> String {
    let addr_type: String = orcpt
        .addr_type
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(*c))
        .collect();
    let addr_type = if addr_type.is_empty() {
        "rfc822".to_owned()
    } else {
        addr_type
    };
    let is_utf8_type = addr_type.eq_ignore_ascii_case("utf-8");
    let addr = if is_utf8_type && global {
        decode_utf8_escapes(&orcpt.addr).unwrap_or_else(|| orcpt.addr.clone())
    } else {
        orcpt.addr.clone()
    };
    let clean = clean_address(&addr, global);
    if clean == addr && (addr.is_ascii() || is_utf8_type) {
        format!("{addr_type}; {addr}")
    } else if clean == addr && global && addr_type.eq_ignore_ascii_case("rfc822") {
        format!("utf-8; {addr}")
    } else {
        format!("{addr_type}; {}", mailroom_smtp::xtext::encode(&orcpt.addr))
    }
}

/// Decodes the `\x{HEX}` escapes of a `utf-8` address (RFC 6533 §3, `EmbeddedUnicodeChar`).
/// `None` when an escape is malformed or names no character.
fn decode_utf8_escapes(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("\\x{") {
        let (before, after) = rest.split_at_checked(pos)?;
        out.push_str(before);
        let after = after.get(3..)?;
        let end = after.find('}')?;
        let hex = after.get(..end)?;
        if hex.is_empty() || hex.len() > 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
        rest = after.get(end + 1..)?;
    }
    out.push_str(rest);
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Part 3: the returned message or its header section.

/// Why only the header section is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadersOnly {
    /// `RET=HDRS`.
    Requested,
    /// A delay or success report (RFC 3461 §4.3: the full message goes in "failed" DSNs).
    NotFailure,
    /// Larger than [`DsnInput::max_returned_body`].
    TooLarge,
    /// Bare CR/LF, NUL or lines over 998 octets: it cannot travel as `message/rfc822`.
    Unsafe,
}

/// The third part, ready to write.
#[derive(Debug)]
struct Returned {
    content_type: &'static str,
    description: &'static str,
    transfer: Transfer,
    body: Vec<u8>,
    headers_only: Option<HeadersOnly>,
}

impl Returned {
    /// The sentence of the text part that says what is attached.
    fn note(&self, max: usize) -> String {
        match self.headers_only {
            None => "A copy of your message is attached.".to_owned(),
            Some(HeadersOnly::Requested) => {
                "The header section of your message is attached, as you asked.".to_owned()
            }
            Some(HeadersOnly::NotFailure) => {
                "The header section of your message is attached.".to_owned()
            }
            Some(HeadersOnly::TooLarge) => format!(
                "Your message is larger than {max} octets, so only its header section is \
                 attached."
            ),
            Some(HeadersOnly::Unsafe) => "Your message cannot be attached as it was sent, so \
                                          only its header section is attached."
                .to_owned(),
        }
    }
}

/// Chooses what to return (RFC 3461 §4.3, RFC 6522 §4, RFC 6532 §3.7-3.8).
fn returned_content(input: &DsnInput<'_>, global: bool, failure: bool) -> Returned {
    let original = input.original;
    let headers_only = if !failure {
        Some(HeadersOnly::NotFailure)
    } else if input.envelope.ret == Some(Ret::Hdrs) {
        Some(HeadersOnly::Requested)
    } else if original.len() > input.max_returned_body {
        Some(HeadersOnly::TooLarge)
    } else if !Shape::of(original).clean {
        Some(HeadersOnly::Unsafe)
    } else {
        None
    };
    let Some(reason) = headers_only else {
        return Returned {
            content_type: if global {
                "message/global"
            } else {
                "message/rfc822"
            },
            description: "Undelivered Message",
            transfer: Transfer::of(original),
            body: with_final_crlf(original),
            headers_only: None,
        };
    };
    let headers = header_section(original);
    let (transfer, body) = if Shape::of(headers).clean {
        (Transfer::of(headers), with_final_crlf(headers))
    } else {
        (Transfer::Base64, base64_lines(headers))
    };
    Returned {
        content_type: if global {
            "message/global-headers"
        } else {
            "text/rfc822-headers"
        },
        description: if failure {
            "Undelivered Message Headers"
        } else {
            "Message Headers"
        },
        transfer,
        body,
        headers_only: Some(reason),
    }
}

/// The header section of a message, with the CRLF of its last field but without the empty line
/// (RFC 5322 §2.1); the whole message if it has no body.
fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(pos) => message.get(..pos + 2).unwrap_or(message),
        None => message,
    }
}

/// What the lines of some content look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    /// Only CRLF line ends (the last line may lack one), no NUL, no line over 998 octets.
    clean: bool,
}

impl Shape {
    fn of(bytes: &[u8]) -> Shape {
        let mut clean = true;
        let mut segments = bytes.split(|&b| b == b'\n').peekable();
        while let Some(segment) = segments.next() {
            let line = if segments.peek().is_none() {
                segment
            } else if let Some(line) = segment.strip_suffix(b"\r") {
                line
            } else {
                clean = false;
                segment
            };
            if line.len() > MAX_LINE || line.iter().any(|&b| b == b'\r' || b == 0) {
                clean = false;
            }
        }
        Shape { clean }
    }
}

/// `bytes` ending with CRLF (unless empty).
fn with_final_crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(bytes);
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Base64 in lines of 76 characters, each ending with CRLF.
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(encoded.len() + encoded.len() / BASE64_LINE * 2 + 2);
    for line in encoded.as_bytes().chunks(BASE64_LINE) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Assembly.

/// A `Content-Transfer-Encoding` (RFC 2045 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    SevenBit,
    EightBit,
    Base64,
}

impl Transfer {
    /// `7bit` or `8bit` for content already in lines of at most 998 octets.
    fn of(bytes: &[u8]) -> Transfer {
        if bytes.is_ascii() {
            Transfer::SevenBit
        } else {
            Transfer::EightBit
        }
    }

    /// The header value, `None` for the default `7bit`.
    fn header(self) -> Option<&'static str> {
        match self {
            Transfer::SevenBit => None,
            Transfer::EightBit => Some("8bit"),
            Transfer::Base64 => Some("base64"),
        }
    }
}

/// One body part of the report.
struct Part<'a> {
    content_type: &'static str,
    description: &'static str,
    transfer: Transfer,
    body: &'a [u8],
}

/// The message: header section, preamble, the parts between boundary delimiters (RFC 2046
/// §5.1.1), the close delimiter.
fn assemble(head: &str, boundary: &str, parts: &[Part<'_>]) -> Vec<u8> {
    let size = head.len() + parts.iter().map(|p| p.body.len() + 200).sum::<usize>() + 200;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n\r\n");
    for part in parts {
        let mut part_head = String::new();
        push_field(&mut part_head, "Content-Description", part.description);
        push_field(&mut part_head, "Content-Type", part.content_type);
        if let Some(encoding) = part.transfer.header() {
            push_field(&mut part_head, "Content-Transfer-Encoding", encoding);
        }
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        out.extend_from_slice(part_head.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.body);
        if !part.body.is_empty() && !part.body.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// A boundary from `candidate` that occurs in none of `contents` (RFC 2046 §5.1.1: it must not
/// appear inside the encapsulated parts). Candidates are random, so the first one is almost
/// always taken; after [`BOUNDARY_TRIES`] collisions the last is used.
fn choose_boundary(contents: &[&[u8]], mut candidate: impl FnMut() -> String) -> String {
    let mut boundary = candidate();
    for _ in 1..BOUNDARY_TRIES {
        let taken = contents.iter().any(|c| contains(c, boundary.as_bytes()));
        if !taken {
            break;
        }
        boundary = candidate();
    }
    boundary
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Text helpers: sanitizing, folding, dates.

/// `text` made safe for one header field or text line: control characters and Unicode white
/// space (CR, LF, TAB, NUL, NEL, U+2028, ...) become spaces, invisible formatting characters
/// (bidirectional overrides, zero-width) are dropped, runs of spaces collapse to one, the ends
/// are trimmed; without `utf8`, non-ASCII characters become `?`. At most `max_chars`
/// characters are kept, then `...`.
fn clean_text(text: &str, utf8: bool, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars + 3));
    let mut count = 0;
    let mut after_space = true;
    for c in text.chars() {
        if is_invisible_format(c) {
            continue;
        }
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else if !utf8 && !c.is_ascii() {
            '?'
        } else {
            c
        };
        if c == ' ' {
            if after_space {
                continue;
            }
            after_space = true;
        } else {
            after_space = false;
        }
        if count == max_chars {
            out.push_str("...");
            break;
        }
        out.push(c);
        count += 1;
    }
    while out.ends_with(' ') {
        out.pop();
    }
    out
}

/// Zero-width and bidirectional formatting characters, which can make text read differently
/// from what it is.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}')
}

/// An address for `<...>` or a DSN field: [`clean_text`] without angle brackets.
fn clean_address(address: &str, utf8: bool) -> String {
    clean_text(address, utf8, MAX_VALUE_CHARS).replace(['<', '>'], "")
}

/// A host name (or address literal) for `dns; host` and `Message-ID`: only letters, digits and
/// `-._:[]` are kept.
fn clean_host(host: &str) -> String {
    host.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._:[]".contains(*c))
        .take(MAX_VALUE_CHARS)
        .collect()
}

/// Our host name, cleaned; `localhost` if nothing is left (a configuration error, but the
/// report must still be well-formed).
fn reporting_host(input: &DsnInput<'_>) -> String {
    let host = clean_host(input.reporting_mta);
    if host.is_empty() {
        "localhost".to_owned()
    } else {
        host
    }
}

/// A date-time of RFC 5322 §3.3 in UTC; a value out of range is written as the epoch.
fn rfc5322_date(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

/// Appends `name: value` folded at spaces (RFC 5322 §2.2.3), each line CRLF-terminated.
fn push_field(out: &mut String, name: &str, value: &str) {
    push_wrapped(out, &format!("{name}: "), " ", value);
}

/// Appends a paragraph of text, wrapped, each line CRLF-terminated.
fn push_paragraph(out: &mut String, text: &str) {
    push_wrapped(out, "", "", text);
}

/// Appends `text` in lines that start with `first` (the first line) or `next` (the others).
fn push_wrapped(out: &mut String, first: &str, next: &str, text: &str) {
    for line in wrap(first, next, text) {
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Splits `text` at white space and control characters into lines of at most 78 octets where
/// the words allow and never more than 998: the first line starts with `first`, the others with
/// `next`. A word too long for a line is cut at character boundaries. No line ends with a
/// space, none is empty after its prefix, and no CR or LF survives.
fn wrap(first: &str, next: &str, text: &str) -> Vec<String> {
    let room = MAX_LINE.saturating_sub(first.len().max(next.len())).max(4);
    let mut lines = Vec::new();
    let mut line = String::from(first);
    let mut words = 0usize;
    let separators = |c: char| c.is_whitespace() || c.is_control();
    for word in text.split(separators).filter(|w| !w.is_empty()) {
        for piece in pieces(word, room) {
            if words > 0 && line.len() + 1 + piece.len() > FOLD_AT {
                lines.push(std::mem::replace(&mut line, String::from(next)));
                words = 0;
            }
            if words > 0 {
                line.push(' ');
            }
            line.push_str(piece);
            words += 1;
        }
    }
    if words == 0 {
        line.truncate(line.trim_end().len());
    }
    lines.push(line);
    lines
}

/// `word` in pieces of at most `max` octets, cut at character boundaries.
fn pieces(word: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = word;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = max.min(rest.len());
        while end > 0 && !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end == 0 {
            end = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (piece, tail) = rest.split_at_checked(end)?;
        rest = tail;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_table() {
        let cases = [
            ("550 user unknown", "550 user unknown"),
            (
                "550 a\r\nX-Injected: yes\r\n\r\n--b",
                "550 a X-Injected: yes --b",
            ),
            ("  a \t b\0c\u{85}d\u{2028}e  ", "a b c d e"),
            ("caf\u{e9} \u{202E}evil", "caf? evil"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(clean_text(input, false, 100), expected, "{input:?}");
        }
        assert_eq!(clean_text("caf\u{e9}", true, 100), "caf\u{e9}");
        assert_eq!(clean_text("abcdef", false, 3), "abc...");
    }

    #[test]
    fn wrap_folds_at_spaces_and_cuts_long_words() {
        let words = "word ".repeat(40);
        let lines = wrap("Diagnostic-Code: ", " ", &words);
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|l| l.len() <= FOLD_AT));
        assert!(lines.iter().skip(1).all(|l| l.starts_with(' ')));
        let unfolded: String = lines.concat();
        assert_eq!(unfolded, format!("Diagnostic-Code: {}", words.trim_end()));

        let long = "\u{e9}".repeat(1500);
        let lines = wrap("X: ", " ", &long);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
        let joined: String = lines
            .iter()
            .map(|l| l.trim_start_matches("X: ").trim())
            .collect();
        assert_eq!(joined, long);

        assert_eq!(wrap("Empty: ", " ", "\r\n"), vec!["Empty:".to_owned()]);
        assert_eq!(wrap("A: ", " ", "x\r\nB: y"), vec!["A: x B: y".to_owned()]);
    }

    #[test]
    fn shape_table() {
        let cases: &[(&[u8], bool)] = &[
            (b"a: b\r\n\r\nbody\r\n", true),
            (b"a: b\r\n\r\nno final crlf", true),
            (b"", true),
            (b"a: b\n\nbare lf\n", false),
            (b"a: b\r\n\r\nbare\rcr\r\n", false),
            (b"a: b\r\n\r\nnul\0\r\n", false),
        ];
        for (input, clean) in cases {
            assert_eq!(Shape::of(input).clean, *clean, "{input:?}");
        }
        let mut long = b"a: b\r\n\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', 999));
        long.extend_from_slice(b"\r\n");
        assert!(!Shape::of(&long).clean);
    }

    #[test]
    fn header_section_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
            (b"A: 1\r\n", b"A: 1\r\n"),
            (b"\r\nbody only\r\n", b""),
            (b"", b""),
        ];
        for (input, expected) in cases {
            assert_eq!(header_section(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn boundary_skips_candidates_found_in_the_content() {
        let original: &[u8] = b"Subject: x\r\n\r\n--=_first\r\n";
        let mut candidates = ["=_first", "=_second"].into_iter();
        let boundary = choose_boundary(&[original], || {
            candidates.next().unwrap_or("=_third").to_owned()
        });
        assert_eq!(boundary, "=_second");
    }

    #[test]
    fn utf8_escapes() {
        assert_eq!(
            decode_utf8_escapes("j\\x{F6}rg@b\\x{FC}cher.example").as_deref(),
            Some("j\u{f6}rg@b\u{fc}cher.example")
        );
        assert_eq!(decode_utf8_escapes("plain@x").as_deref(), Some("plain@x"));
        assert_eq!(decode_utf8_escapes("a\\x{}@x"), None);
        assert_eq!(decode_utf8_escapes("a\\x{D800}@x"), None);
        assert_eq!(decode_utf8_escapes("a\\x{41"), None);
    }

    #[test]
    fn envelope_id_is_decoded_when_printable_else_xtext() {
        assert_eq!(envelope_id("abc-123"), "abc-123");
        assert_eq!(envelope_id("a+b c"), "a+b c");
        assert_eq!(envelope_id("caf\u{e9}"), "caf+C3+A9");
        assert_eq!(envelope_id(" lead"), "+20lead");
    }

    #[test]
    fn diagnostic_types() {
        let cases = [
            ("550 5.1.1 unknown", "smtp"),
            ("421-busy", "smtp"),
            ("250", "smtp"),
            ("connect to mx.example: timed out", "X-Mailroom"),
            ("5500 odd", "X-Mailroom"),
            ("650 not a reply code", "X-Mailroom"),
            ("", "X-Mailroom"),
        ];
        for (text, expected) in cases {
            assert_eq!(diagnostic_type(text), expected, "{text}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000_123),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(rfc5322_date(u64::MAX), "Thu, 01 Jan 1970 00:00:00 +0000");
    }

    #[test]
    fn invalid_status_falls_back_to_the_action() {
        let report = RecipientReport {
            recipient: Recipient {
                address: "a@b".into(),
                domain: "b".into(),
                notify: None,
                orcpt: None,
            },
            action: Action::Failed,
            status: (7, 1, 1),
            remote_mta: None,
            diagnostic: None,
            last_attempt_ms: None,
            will_retry_until_ms: None,
        };
        assert_eq!(valid_status(&report), EnhancedCode(5, 0, 0));
        let report = RecipientReport {
            status: (4, 1000, 1),
            action: Action::Delayed,
            ..report
        };
        assert_eq!(valid_status(&report), EnhancedCode(4, 0, 0));
    }
}
