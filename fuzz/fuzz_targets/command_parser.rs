//! Fuzzes the command-line path of the server: `LineReader` over arbitrary input, then
//! `parse_command` on every line (and on the raw input). Checks that nothing panics, that the
//! line buffer stays bounded, that error replies are well-formed single lines, and that parsed
//! addresses survive `Display` -> `Mailbox::parse`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mailroom_smtp::{
    Command, ForwardPath, LineReader, Mailbox, ReplyParser, ReversePath, parse_command,
};

const MAX_LINE: usize = 512;

fuzz_target!(|data: &[u8]| {
    check_line(data);

    let mut reader = LineReader::new(MAX_LINE);
    let mut buf = BytesMut::new();
    for piece in data.chunks(97) {
        buf.extend_from_slice(piece);
        while let Some(line) = reader.read_line(&mut buf) {
            if let Ok(line) = line {
                assert!(line.len() <= MAX_LINE - 2);
                check_line(&line);
            }
        }
        assert!(buf.len() < MAX_LINE);
    }

    // The client-side reply parser must not panic or grow beyond its line limit either.
    let mut parser = ReplyParser::new(MAX_LINE);
    let mut buf = BytesMut::new();
    for piece in data.chunks(61) {
        buf.extend_from_slice(piece);
        while let Some(reply) = parser.parse(&mut buf) {
            if let Ok(reply) = reply {
                assert_well_formed(&reply.to_bytes());
            }
        }
        assert!(buf.len() < MAX_LINE);
    }
});

fn check_line(line: &[u8]) {
    match parse_command(line) {
        Ok(Command::Mail {
            from: ReversePath::Mailbox(m),
            ..
        }) => round_trip(&m),
        Ok(Command::Rcpt {
            to: ForwardPath::Mailbox(m),
            ..
        }) => round_trip(&m),
        Ok(_) => {}
        Err(e) => assert_well_formed(&e.reply().to_bytes()),
    }
}

fn round_trip(m: &Mailbox) {
    let shown = m.to_string();
    assert_eq!(Mailbox::parse(&shown).as_ref(), Ok(m), "{shown}");
}

/// Every CR is followed by LF and every LF preceded by CR, and the reply ends with CRLF.
fn assert_well_formed(wire: &[u8]) {
    assert!(wire.ends_with(b"\r\n"));
    for (i, &b) in wire.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(wire.get(i + 1), Some(&b'\n'));
        }
        if b == b'\n' {
            assert!(i > 0 && wire[i - 1] == b'\r');
        }
    }
}
