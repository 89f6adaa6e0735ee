//! DSN building through the public API: the output is parsed with mail-parser to check the
//! multipart/report structure (RFC 6522), the delivery-status fields (RFC 3464) and the DSN
//! parameter rules (RFC 3461), plus byte-level checks on line length and line ends.

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders};
use mailroom_outbound::dsn::{self, Action, Dsn, DsnInput, RecipientReport};
use mailroom_queue::{Envelope, QueueId, Recipient};
use mailroom_smtp::{Body, Notify, Orcpt, Ret};

const ORIGINAL: &[u8] = b"Received: from client.example.org by mx.example.org\r\n\
From: Alice <alice@example.org>\r\n\
To: Bob <bob@example.net>\r\n\
Subject: hello\r\n\
Message-ID: <m1@example.org>\r\n\
\r\n\
Hello Bob,\r\n\
see you tomorrow.\r\n";

const ARRIVAL_MS: u64 = 1_700_000_000_000;
const NOW_MS: u64 = 1_700_000_600_000;

fn recipient(address: &str) -> Recipient {
    Recipient {
        address: address.to_owned(),
        domain: address
            .rsplit_once('@')
            .map(|(_, d)| d.to_lowercase())
            .unwrap_or_default(),
        notify: None,
        orcpt: None,
    }
}

fn notify(never: bool, success: bool, failure: bool, delay: bool) -> Option<Notify> {
    Some(Notify {
        never,
        success,
        failure,
        delay,
    })
}

fn envelope(sender: &str, recipients: Vec<Recipient>) -> Envelope {
    Envelope {
        id: QueueId::new(),
        sender: sender.to_owned(),
        recipients,
        ret: None,
        envid: None,
        body_type: None,
        smtputf8: false,
        received_at_ms: ARRIVAL_MS,
        listener: "mx".to_owned(),
        client_ip: None,
        helo: Some("client.example.org".to_owned()),
        auth_user: None,
        policy: "default".to_owned(),
        message_id: Some("<m1@example.org>".to_owned()),
    }
}

fn failed(recipient: Recipient, diagnostic: &str) -> RecipientReport {
    RecipientReport {
        recipient,
        action: Action::Failed,
        status: (5, 1, 1),
        remote_mta: Some("mx1.example.net".to_owned()),
        diagnostic: Some(diagnostic.to_owned()),
        last_attempt_ms: Some(NOW_MS),
        will_retry_until_ms: None,
    }
}

fn delayed(recipient: Recipient) -> RecipientReport {
    RecipientReport {
        recipient,
        action: Action::Delayed,
        status: (4, 4, 1),
        remote_mta: None,
        diagnostic: Some("connect to mx1.example.net: connection timed out".to_owned()),
        last_attempt_ms: Some(NOW_MS),
        will_retry_until_ms: Some(ARRIVAL_MS + 5 * 86_400_000),
    }
}

fn delivered(recipient: Recipient) -> RecipientReport {
    RecipientReport {
        recipient,
        action: Action::Delivered,
        status: (2, 0, 0),
        remote_mta: Some("mx1.example.net".to_owned()),
        diagnostic: Some("250 2.0.0 Ok: queued as 12345".to_owned()),
        last_attempt_ms: Some(NOW_MS),
        will_retry_until_ms: None,
    }
}

fn input<'a>(
    envelope: &'a Envelope,
    original: &'a [u8],
    reports: &'a [RecipientReport],
) -> DsnInput<'a> {
    DsnInput {
        reporting_mta: "mx.example.org",
        from: "MAILER-DAEMON@mx.example.org",
        envelope,
        original,
        reports,
        arrival_ms: ARRIVAL_MS,
        now_ms: NOW_MS,
        message_id_domain: "mx.example.org",
        max_returned_body: 10 * 1024 * 1024,
    }
}

fn build(envelope: &Envelope, original: &[u8], reports: &[RecipientReport]) -> Dsn {
    let dsn = dsn::build(&input(envelope, original, reports)).expect("a DSN is due");
    assert_lines_ok(&dsn.message);
    dsn
}

/// Every line ends with CRLF, no bare CR or LF, no line over 998 octets (RFC 5322 §2.1.1).
fn assert_lines_ok(message: &[u8]) {
    let mut lines: Vec<&[u8]> = message.split(|&b| b == b'\n').collect();
    assert_eq!(
        lines.pop(),
        Some(&b""[..]),
        "message does not end with a line end"
    );
    for (n, line) in lines.into_iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| {
            panic!(
                "line {n} ends with a bare LF: {:?}",
                String::from_utf8_lossy(line)
            )
        });
        assert!(!line.contains(&b'\r'), "line {n} has a bare CR");
        assert!(line.len() <= 998, "line {n} is {} octets long", line.len());
    }
}

fn parse(dsn: &Dsn) -> Message<'_> {
    MessageParser::default()
        .parse(&dsn.message)
        .expect("the DSN parses")
}

/// The three parts of the report, checking the multipart/report shell on the way.
fn parts<'a>(message: &'a Message<'a>) -> [&'a MessagePart<'a>; 3] {
    let ct = message.content_type().expect("Content-Type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    let ids = message.root_part().sub_parts().expect("multipart");
    assert_eq!(ids.len(), 3, "three parts");
    let part = |i: usize| {
        ids.get(i)
            .and_then(|id| message.part(*id))
            .expect("part exists")
    };
    [part(0), part(1), part(2)]
}

fn content_type(part: &MessagePart<'_>) -> String {
    let ct = part.content_type().expect("part Content-Type");
    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
}

/// The delivery-status blocks (per-message first), each a list of (field, value), unfolded.
fn status_blocks(part: &MessagePart<'_>) -> Vec<Vec<(String, String)>> {
    let text = std::str::from_utf8(part.contents()).expect("UTF-8 status");
    let unfolded = text.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded
        .split("\r\n\r\n")
        .map(|block| {
            block
                .split("\r\n")
                .filter(|l| !l.is_empty())
                .map(|line| {
                    let (name, value) = line.split_once(':').expect("field: value");
                    (name.to_owned(), value.trim().to_owned())
                })
                .collect()
        })
        .collect()
}

fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn text(part: &MessagePart<'_>) -> String {
    part.text_contents().expect("text").replace("\r\n", " ")
}

#[test]
fn failure_report_has_the_rfc6522_structure() {
    let env = envelope("alice@example.org", vec![recipient("bob@example.net")]);
    let reports = [failed(
        recipient("bob@example.net"),
        "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
    )];
    let dsn = build(&env, ORIGINAL, &reports);
    assert_eq!(dsn.sender, "");
    assert_eq!(dsn.recipient, "alice@example.org");
    assert!(!dsn.smtputf8);
    assert_eq!(dsn.body, Body::SevenBit);

    let message = parse(&dsn);
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    let to = message
        .to()
        .and_then(|a| a.first())
        .and_then(|a| a.address());
    assert_eq!(to, Some("alice@example.org"));
    let from = message
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address());
    assert_eq!(from, Some("MAILER-DAEMON@mx.example.org"));
    assert!(message.date().is_some());
    let message_id = message.message_id().expect("Message-ID");
    assert!(message_id.ends_with("@mx.example.org"), "{message_id}");
    assert_eq!(
        message.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    let ct = message.content_type().expect("Content-Type");
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let boundary = ct.attribute("boundary").expect("boundary");
    assert!(
        !ORIGINAL
            .windows(boundary.len())
            .any(|w| w == boundary.as_bytes())
    );

    let [human, status, returned] = parts(&message);
    assert_eq!(content_type(human), "text/plain");
    let explanation = text(human);
    assert!(explanation.contains("mx.example.org"), "{explanation}");
    assert!(explanation.contains("<bob@example.net>"), "{explanation}");
    assert!(explanation.contains("User unknown"), "{explanation}");
    assert!(explanation.contains("mx1.example.net"), "{explanation}");

    assert_eq!(content_type(status), "message/delivery-status");
    let blocks = status_blocks(status);
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    let per_message = &blocks[0];
    assert_eq!(
        field(per_message, "Reporting-MTA"),
        Some("dns; mx.example.org")
    );
    assert_eq!(
        field(per_message, "Arrival-Date"),
        Some("Tue, 14 Nov 2023 22:13:20 +0000")
    );
    assert_eq!(field(per_message, "Original-Envelope-Id"), None);
    let rcpt = &blocks[1];
    assert_eq!(
        field(rcpt, "Final-Recipient"),
        Some("rfc822; bob@example.net")
    );
    assert_eq!(field(rcpt, "Original-Recipient"), None);
    assert_eq!(field(rcpt, "Action"), Some("failed"));
    assert_eq!(field(rcpt, "Status"), Some("5.1.1"));
    assert_eq!(field(rcpt, "Remote-MTA"), Some("dns; mx1.example.net"));
    assert_eq!(
        field(rcpt, "Diagnostic-Code"),
        Some("smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown")
    );
    assert_eq!(
        field(rcpt, "Last-Attempt-Date"),
        Some("Tue, 14 Nov 2023 22:23:20 +0000")
    );
    assert_eq!(field(rcpt, "Will-Retry-Until"), None);

    assert_eq!(content_type(returned), "message/rfc822");
    let inner = returned.message().expect("nested message");
    assert_eq!(inner.subject(), Some("hello"));
    assert!(
        inner
            .body_text(0)
            .is_some_and(|b| b.contains("see you tomorrow"))
    );
}

#[test]
fn should_notify_follows_rfc3461() {
    use Action::*;
    let cases = [
        // (NOTIFY, action, expected)
        (None, Failed, true),
        (None, Delayed, true),
        (None, Delivered, false),
        (None, Relayed, false),
        (None, Expanded, false),
        (notify(true, false, false, false), Failed, false),
        (notify(true, false, false, false), Delayed, false),
        (notify(true, false, false, false), Delivered, false),
        (notify(false, true, false, false), Delivered, true),
        (notify(false, true, false, false), Relayed, true),
        (notify(false, true, false, false), Expanded, true),
        (notify(false, true, false, false), Failed, false),
        (notify(false, true, false, false), Delayed, false),
        (notify(false, false, true, false), Failed, true),
        (notify(false, false, true, false), Delayed, false),
        (notify(false, false, false, true), Delayed, true),
        (notify(false, false, false, true), Failed, false),
        (notify(false, true, true, true), Delivered, true),
        (notify(false, false, false, false), Failed, false),
    ];
    for (n, action, expected) in cases {
        let rcpt = Recipient {
            notify: n,
            ..recipient("bob@example.net")
        };
        assert_eq!(
            dsn::should_notify(&rcpt, action),
            expected,
            "{n:?} {action:?}"
        );
    }
}

#[test]
fn no_dsn_for_the_null_sender_or_unwanted_reports() {
    let env = envelope("", vec![recipient("bob@example.net")]);
    let reports = [failed(recipient("bob@example.net"), "550 5.1.1 unknown")];
    assert_eq!(dsn::build(&input(&env, ORIGINAL, &reports)), None);

    let env = envelope("alice@example.org", vec![recipient("bob@example.net")]);
    let never = Recipient {
        notify: notify(true, false, false, false),
        ..recipient("bob@example.net")
    };
    let reports = [failed(never.clone(), "550 5.1.1 unknown"), delayed(never)];
    assert_eq!(dsn::build(&input(&env, ORIGINAL, &reports)), None);

    // Success without NOTIFY=SUCCESS, delay with NOTIFY=FAILURE only.
    let failure_only = Recipient {
        notify: notify(false, false, true, false),
        ..recipient("carol@example.net")
    };
    let reports = [
        delivered(recipient("bob@example.net")),
        delayed(failure_only),
    ];
    assert_eq!(dsn::build(&input(&env, ORIGINAL, &reports)), None);
    assert_eq!(dsn::build(&input(&env, ORIGINAL, &[])), None);
}

#[test]
fn only_requested_recipients_are_reported() {
    let env = envelope("alice@example.org", vec![]);
    let failure_only = Recipient {
        notify: notify(false, false, true, false),
        ..recipient("carol@example.net")
    };
    let wants_delay = Recipient {
        notify: notify(false, false, false, true),
        ..recipient("dave@example.net")
    };
    let reports = [
        failed(recipient("bob@example.net"), "550 5.1.1 unknown"),
        delayed(failure_only),
        delayed(wants_delay),
    ];
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    assert_eq!(
        message.subject(),
        Some("Undelivered Mail Returned to Sender")
    );
    let [human, status, _] = parts(&message);
    let blocks = status_blocks(status);
    let finals: Vec<_> = blocks
        .iter()
        .skip(1)
        .filter_map(|b| field(b, "Final-Recipient"))
        .collect();
    assert_eq!(
        finals,
        ["rfc822; bob@example.net", "rfc822; dave@example.net"]
    );
    assert_eq!(field(&blocks[1], "Will-Retry-Until"), None);
    assert_eq!(
        field(&blocks[2], "Will-Retry-Until"),
        Some("Sun, 19 Nov 2023 22:13:20 +0000")
    );
    assert_eq!(field(&blocks[2], "Action"), Some("delayed"));
    assert_eq!(field(&blocks[2], "Status"), Some("4.4.1"));
    assert_eq!(
        field(&blocks[2], "Diagnostic-Code"),
        Some("X-Mailroom; connect to mx1.example.net: connection timed out")
    );
    let explanation = text(human);
    assert!(!explanation.contains("carol@"), "{explanation}");
    assert!(explanation.contains("dave@example.net"), "{explanation}");
}

#[test]
fn delay_report_returns_headers_only() {
    let env = envelope("alice@example.org", vec![]);
    let reports = [delayed(recipient("bob@example.net"))];
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    assert_eq!(
        message.subject(),
        Some("Delayed Mail (still being retried)")
    );
    let [human, status, returned] = parts(&message);
    assert!(text(human).contains("Will retry until"));
    let blocks = status_blocks(status);
    assert_eq!(field(&blocks[1], "Action"), Some("delayed"));
    assert!(field(&blocks[1], "Will-Retry-Until").is_some());
    assert_eq!(content_type(returned), "text/rfc822-headers");
    let headers = text(returned);
    assert!(headers.contains("Subject: hello"), "{headers}");
    assert!(!headers.contains("see you tomorrow"), "{headers}");
}

#[test]
fn success_report_only_with_notify_success() {
    let env = envelope("alice@example.org", vec![]);
    let wants_success = Recipient {
        notify: notify(false, true, true, false),
        ..recipient("bob@example.net")
    };
    let relayed = RecipientReport {
        action: Action::Relayed,
        ..delivered(Recipient {
            notify: notify(false, true, false, false),
            ..recipient("carol@example.net")
        })
    };
    let reports = [
        delivered(wants_success),
        delivered(recipient("dave@example.net")),
        relayed,
    ];
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    assert_eq!(message.subject(), Some("Successful Mail Delivery Report"));
    let [_, status, returned] = parts(&message);
    let blocks = status_blocks(status);
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    assert_eq!(field(&blocks[1], "Action"), Some("delivered"));
    assert_eq!(field(&blocks[1], "Status"), Some("2.0.0"));
    assert_eq!(field(&blocks[2], "Action"), Some("relayed"));
    assert_eq!(content_type(returned), "text/rfc822-headers");
}

#[test]
fn orcpt_and_envid_are_echoed() {
    let mut env = envelope("alice@example.org", vec![]);
    env.envid = Some("QQ314159".to_owned());
    let with_orcpt = Recipient {
        orcpt: Some(Orcpt {
            addr_type: "rfc822".to_owned(),
            addr: "bob+alias@example.com".to_owned(),
        }),
        ..recipient("bob@example.net")
    };
    let reports = [failed(with_orcpt, "550 5.1.1 unknown")];
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    let [_, status, _] = parts(&message);
    let blocks = status_blocks(status);
    assert_eq!(field(&blocks[0], "Original-Envelope-Id"), Some("QQ314159"));
    assert_eq!(
        blocks[0].first().map(|(n, _)| n.as_str()),
        Some("Original-Envelope-Id")
    );
    let rcpt = &blocks[1];
    assert_eq!(
        field(rcpt, "Original-Recipient"),
        Some("rfc822; bob+alias@example.com")
    );
    // RFC 3464 §2.3: Original-Recipient comes before Final-Recipient.
    let names: Vec<_> = rcpt.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..2], ["Original-Recipient", "Final-Recipient"]);
}

#[test]
fn ret_hdrs_returns_the_header_section_only() {
    let mut env = envelope("alice@example.org", vec![]);
    env.ret = Some(Ret::Hdrs);
    let reports = [failed(recipient("bob@example.net"), "550 5.1.1 unknown")];
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    let [human, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "text/rfc822-headers");
    let headers = text(returned);
    assert!(
        headers.contains("Message-ID: <m1@example.org>"),
        "{headers}"
    );
    assert!(!headers.contains("Hello Bob"), "{headers}");
    assert!(text(human).contains("header section"));

    env.ret = Some(Ret::Full);
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    let [_, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "message/rfc822");
}

#[test]
fn a_large_message_is_returned_as_headers_only() {
    let env = envelope("alice@example.org", vec![]);
    let mut original = ORIGINAL.to_vec();
    for _ in 0..2000 {
        original.extend_from_slice(b"lorem ipsum dolor sit amet, consectetur adipiscing\r\n");
    }
    let reports = [failed(recipient("bob@example.net"), "552 5.3.4 too big")];
    let mut dsn_input = input(&env, &original, &reports);
    dsn_input.max_returned_body = 64 * 1024;
    let dsn = dsn::build(&dsn_input).expect("a DSN");
    assert_lines_ok(&dsn.message);
    assert!(dsn.message.len() < 8 * 1024, "{} octets", dsn.message.len());
    let message = parse(&dsn);
    let [human, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "text/rfc822-headers");
    assert!(text(returned).contains("Subject: hello"));
    assert!(!text(returned).contains("lorem"));
    assert!(text(human).contains("larger than 65536 octets"));

    // Exactly at the limit the whole message comes back.
    dsn_input.max_returned_body = original.len();
    let dsn = dsn::build(&dsn_input).expect("a DSN");
    let message = parse(&dsn);
    let [_, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "message/rfc822");
}

#[test]
fn utf8_recipient_makes_a_global_report() {
    let env = envelope("alice@example.org", vec![]);
    let address = "j\u{f6}rg@b\u{fc}cher.example";
    let with_orcpt = Recipient {
        orcpt: Some(Orcpt {
            addr_type: "utf-8".to_owned(),
            addr: "j\\x{F6}rg@b\\x{FC}cher.example".to_owned(),
        }),
        ..recipient(address)
    };
    let reports = [failed(with_orcpt, "550 5.1.1 unknown user")];
    let dsn = build(&env, ORIGINAL, &reports);
    assert_eq!(dsn.body, Body::EightBitMime);
    assert!(!dsn.smtputf8, "the DSN's own header section is ASCII");
    let message = parse(&dsn);
    let ct = message.content_type().expect("Content-Type");
    assert_eq!(ct.attribute("report-type"), Some("global-delivery-status"));
    let [human, status, returned] = parts(&message);
    assert!(text(human).contains(address));
    assert_eq!(content_type(status), "message/global-delivery-status");
    let blocks = status_blocks(status);
    assert_eq!(
        field(&blocks[1], "Final-Recipient"),
        Some(format!("utf-8; {address}").as_str())
    );
    assert_eq!(
        field(&blocks[1], "Original-Recipient"),
        Some(format!("utf-8; {address}").as_str())
    );
    assert_eq!(content_type(returned), "message/global");
    let inner = returned.message().expect("nested message/global");
    assert_eq!(inner.subject(), Some("hello"));
}

#[test]
fn utf8_headers_in_the_original_are_returned_as_message_global() {
    let env = envelope("j\u{f6}rg@b\u{fc}cher.example", vec![]);
    let original = "From: J\u{f6}rg <j\u{f6}rg@b\u{fc}cher.example>\r\n\
                    Subject: Gr\u{fc}\u{df}e\r\n\r\nHallo\r\n";
    let mut hdrs = env.clone();
    hdrs.ret = Some(Ret::Hdrs);
    let reports = [failed(recipient("bob@example.net"), "550 5.1.1 unknown")];
    let dsn = build(&env, original.as_bytes(), &reports);
    assert!(dsn.smtputf8, "the To field carries a UTF-8 address");
    let message = parse(&dsn);
    let [_, status, returned] = parts(&message);
    assert_eq!(content_type(status), "message/global-delivery-status");
    assert_eq!(content_type(returned), "message/global");
    assert_eq!(
        returned.message().and_then(|m| m.subject()),
        Some("Gr\u{fc}\u{df}e")
    );

    let dsn = build(&hdrs, original.as_bytes(), &reports);
    let message = parse(&dsn);
    let [_, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "message/global-headers");
}

#[test]
fn remote_reply_cannot_inject_fields_or_parts() {
    let env = envelope("alice@example.org", vec![]);
    let evil = "550 5.1.1 no such user\r\nX-Injected: yes\r\n\r\n\
                Final-Recipient: rfc822; evil@example.com\nAction: delivered\r\
                --=_mailroom_\u{0}\u{202E}caf\u{e9}";
    let mut report = failed(recipient("bob@example.net"), evil);
    report.remote_mta = Some("mx1.example.net\r\nX-Evil: 1".to_owned());
    let dsn = build(&env, ORIGINAL, &[report]);
    let raw = String::from_utf8_lossy(&dsn.message);
    for line in raw.split("\r\n") {
        assert!(!line.starts_with("X-Injected"), "{line}");
        assert!(!line.starts_with("X-Evil"), "{line}");
        assert!(!line.starts_with("Final-Recipient: rfc822; evil"), "{line}");
        assert!(!line.starts_with("Action: delivered"), "{line}");
    }
    assert!(dsn.message.is_ascii(), "non-ASCII reply text is replaced");

    let message = parse(&dsn);
    let [_, status, _] = parts(&message);
    let blocks = status_blocks(status);
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    let rcpt = &blocks[1];
    assert_eq!(field(rcpt, "Action"), Some("failed"));
    assert_eq!(
        field(rcpt, "Remote-MTA"),
        Some("dns; mx1.example.netX-Evil:1")
    );
    assert_eq!(
        field(rcpt, "Diagnostic-Code"),
        Some(
            "smtp; 550 5.1.1 no such user X-Injected: yes Final-Recipient: rfc822; \
             evil@example.com Action: delivered --=_mailroom_ caf?"
        )
    );
}

#[test]
fn boundary_does_not_occur_in_the_original() {
    let env = envelope("alice@example.org", vec![]);
    let mut original = ORIGINAL.to_vec();
    original.extend_from_slice(b"--=_mailroom_\r\n=_mailroom_01ARZ3NDEKTSV4RRFFQ69G5FAV\r\n");
    let reports = [failed(recipient("bob@example.net"), "550 5.1.1 unknown")];
    let dsn = build(&env, &original, &reports);
    let message = parse(&dsn);
    let boundary = message
        .content_type()
        .and_then(|ct| ct.attribute("boundary"))
        .expect("boundary");
    assert!(boundary.starts_with("=_mailroom_"), "{boundary}");
    assert!(
        !original
            .windows(boundary.len())
            .any(|w| w == boundary.as_bytes())
    );
    let delimiters = dsn
        .message
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(format!("--{boundary}").as_bytes()))
        .count();
    assert_eq!(delimiters, 4, "three parts and the close delimiter");
}

#[test]
fn long_values_are_folded_within_998_octets() {
    let mut env = envelope("alice@example.org", vec![]);
    env.envid = Some("x".repeat(100));
    let long_words = format!("550 5.1.1 {}", "mailbox unavailable ".repeat(200));
    let one_word = format!("550 {}", "A".repeat(3000));
    let reports = [
        failed(recipient("bob@example.net"), &long_words),
        failed(recipient("carol@example.net"), &one_word),
    ];
    let dsn = build(&env, ORIGINAL, &reports);
    let message = parse(&dsn);
    let [_, status, _] = parts(&message);
    let blocks = status_blocks(status);
    let first = field(&blocks[1], "Diagnostic-Code").expect("diagnostic");
    assert!(first.starts_with("smtp; 550 5.1.1 mailbox unavailable mailbox"));
    assert!(first.ends_with("..."), "capped at the diagnostic limit");
    let second = field(&blocks[2], "Diagnostic-Code").expect("diagnostic");
    assert!(second.contains("AAAA"));
}

#[test]
fn an_original_with_bare_line_ends_is_returned_safely() {
    let env = envelope("alice@example.org", vec![]);
    let reports = [failed(recipient("bob@example.net"), "550 5.1.1 unknown")];

    // A body the client could not send as is: headers only.
    let mut original = ORIGINAL.to_vec();
    original.extend_from_slice(b"bare\nlf and a ");
    original.extend(std::iter::repeat_n(b'x', 2000));
    original.extend_from_slice(b"\r\n");
    let dsn = build(&env, &original, &reports);
    let message = parse(&dsn);
    let [_, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "text/rfc822-headers");
    assert!(text(returned).contains("Subject: hello"));

    // Broken headers: base64, so the report itself stays well-formed.
    let original = b"Subject: bare\nlf\r\nX: \0\r\n\r\nbody\r\n";
    let dsn = build(&env, original, &reports);
    let message = parse(&dsn);
    let [_, _, returned] = parts(&message);
    assert_eq!(content_type(returned), "text/rfc822-headers");
    assert_eq!(
        returned
            .content_transfer_encoding()
            .map(str::to_ascii_lowercase),
        Some("base64".to_owned())
    );
    assert!(
        std::str::from_utf8(returned.contents()).is_ok_and(|t| t.contains("Subject: bare\nlf"))
    );
}

#[test]
fn message_ids_and_boundaries_are_unique() {
    let env = envelope("alice@example.org", vec![]);
    let reports = [failed(recipient("bob@example.net"), "550 5.1.1 unknown")];
    let a = build(&env, ORIGINAL, &reports);
    let b = build(&env, ORIGINAL, &reports);
    let (a, b) = (parse(&a), parse(&b));
    assert_ne!(a.message_id(), b.message_id());
    assert_ne!(
        a.content_type().and_then(|c| c.attribute("boundary")),
        b.content_type().and_then(|c| c.attribute("boundary"))
    );
}

#[test]
fn odd_inputs_still_give_well_formed_reports() {
    let originals: [&[u8]; 6] = [
        b"",
        b"\r\n",
        b"\r",
        b"Subject: no body, no final line end",
        b"\r\n\r\nbody without headers\r\n",
        "Subject: \u{1F600}\r\n\r\n\u{1F600}\r\n".as_bytes(),
    ];
    let senders = [
        "alice@example.org",
        "a\r\nBcc: x@y",
        "\u{1F600}@example.org",
    ];
    let mut weird = recipient("x\r\n\u{202E}y@\u{0}z");
    weird.notify = notify(false, true, true, true);
    weird.orcpt = Some(Orcpt {
        addr_type: "\r\n".to_owned(),
        addr: "a b\r\nc".to_owned(),
    });
    let actions = [
        Action::Failed,
        Action::Delayed,
        Action::Delivered,
        Action::Relayed,
        Action::Expanded,
    ];
    let reports: Vec<RecipientReport> = actions
        .iter()
        .map(|&action| RecipientReport {
            recipient: weird.clone(),
            action,
            status: (9, 9999, 0),
            remote_mta: Some(" \r\n ".to_owned()),
            diagnostic: Some("\r\n\t\u{0}".to_owned()),
            last_attempt_ms: Some(u64::MAX),
            will_retry_until_ms: Some(u64::MAX),
        })
        .collect();
    for original in originals {
        for sender in senders {
            let mut env = envelope(sender, vec![]);
            env.envid = Some("\r\nenv id\u{e9}".to_owned());
            let dsn_input = DsnInput {
                reporting_mta: "mx example\r\n",
                from: "MAILER-DAEMON\r\n@x",
                message_id_domain: "",
                now_ms: u64::MAX,
                arrival_ms: 0,
                max_returned_body: 0,
                ..input(&env, original, &reports)
            };
            let dsn = dsn::build(&dsn_input).expect("a DSN");
            assert_lines_ok(&dsn.message);
            let message = parse(&dsn);
            let [_, status, _] = parts(&message);
            let blocks = status_blocks(status);
            assert_eq!(blocks.len(), 6, "{blocks:?}");
            assert_eq!(field(&blocks[1], "Status"), Some("5.0.0"));
            assert_eq!(field(&blocks[2], "Status"), Some("4.0.0"));
            assert_eq!(field(&blocks[3], "Status"), Some("2.0.0"));
        }
    }
}
