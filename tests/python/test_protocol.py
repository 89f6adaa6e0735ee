"""SMTP protocol details over a raw socket: DATA framing, strict CRLF, limits, error replies."""

import re
import time

import pytest

from conftest import HOSTNAME, RawSMTP, parse_queued_id, split_received

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(limits={"maxLineLength": 200, "maxErrors": 5, "maxMessagesPerConnection": 3,
                                       "maxConnectionsPerIp": 4, "maxConnections": 50})


def session(server) -> RawSMTP:
    c = RawSMTP(server.port())
    assert c.banner()[0] == 220
    c.ehlo()
    return c


def start_data(c: RawSMTP):
    assert c.cmd("MAIL FROM:<alice@client.example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def test_end_of_data_split_across_writes(server):
    msg = b"Subject: split\r\n\r\nbody\r\n"
    with session(server) as c:
        start_data(c)
        wire = msg + b".\r\n"
        c.send(wire[:-5])  # then the final CRLF "." CRLF one byte at a time
        for b in wire[-5:]:
            time.sleep(0.02)
            c.send(bytes([b]))
        code, lines = c.reply()
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    assert split_received(server.queue_show(qid)[1])[1] == msg


def test_empty_message(server):
    with session(server) as c:
        start_data(c)
        c.send(b".\r\n")
        code, lines = c.reply()
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    assert split_received(server.queue_show(qid)[1])[1] == b""


def test_dot_lines_and_fake_terminators(server):
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n. \r\nx.\r\n.x\r\n\r\n"
    wire = b"Subject: dots\r\n\r\n..\r\n...\r\n.. \r\nx.\r\n..x\r\n\r\n.\r\n"
    with session(server) as c:
        start_data(c)
        c.send(wire)
        code, lines = c.reply()
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    assert split_received(server.queue_show(qid)[1])[1] == body


@pytest.mark.parametrize("bad, code, ecode", [
    (b"bare LF\nin body\r\n", 550, "5.5.2"),
    (b"bare CR\rin body\r\n", 550, "5.5.2"),
    (b"NUL \x00 in body\r\n", 550, "5.6.0"),
])
def test_data_content_refused_connection_usable(server, bad, code, ecode):
    with session(server) as c:
        start_data(c)
        c.send(b"Subject: bad\r\n\r\n" + bad + b".\r\n")
        got, lines = c.reply()
        assert (got, lines[0][:5]) == (code, ecode), (got, lines)
        # the transaction is over; the session continues
        start_data(c)
        c.send(b"Subject: good\r\n\r\nok\r\n.\r\n")
        assert c.reply()[0] == 250


def test_line_longer_than_max_line_length(server):
    with session(server) as c:
        start_data(c)
        c.send(b"Subject: long\r\n\r\n" + b"a" * 250 + b"\r\n.\r\n")
        code, lines = c.reply()
        assert code == 550 and lines[0].startswith("5.5.2"), (code, lines)
        # a line of exactly maxLineLength (200 octets with the CRLF) is fine
        start_data(c)
        c.send(b"Subject: long\r\n\r\n" + b"a" * 198 + b"\r\n.\r\n")
        code, lines = c.reply()
        assert code == 250, (code, lines)


def test_line_too_long_reply_states_configured_limit(server):
    with session(server) as c:
        start_data(c)
        c.send(b"Subject: long\r\n\r\n" + b"a" * 250 + b"\r\n.\r\n")
        code, lines = c.reply()
        assert code == 550
        assert "1000" not in lines[0], lines


def test_command_line_too_long(server):
    with session(server) as c:
        code, lines = c.cmd(b"NOOP " + b"x" * 600)
        assert code == 500 and lines[0].startswith("5.5.2"), (code, lines)
        assert c.cmd("NOOP")[0] == 250


def test_bare_lf_command(server):
    with session(server) as c:
        c.send(b"NOOP\n")
        code, lines = c.reply()
        assert code == 500 and lines[0].startswith("5.5.2"), (code, lines)
        assert c.cmd("NOOP")[0] == 250


def test_helo_then_mail(server):
    msg = b"Subject: helo\r\n\r\nx\r\n"
    with RawSMTP(server.port()) as c:
        c.banner()
        code, lines = c.cmd("HELO old.client.example.org")
        assert code == 250 and lines[0].startswith(HOSTNAME), (code, lines)
        start_data(c)
        c.send(msg + b".\r\n")
        code, lines = c.reply()
        assert code == 250
        qid = parse_queued_id(lines[0])
    received, rest = split_received(server.queue_show(qid)[1])
    assert rest == msg
    assert b"with SMTP id" in received and b"from old.client.example.org" in received


def test_sequence_errors(server):
    with RawSMTP(server.port()) as c:
        c.banner()
        code, lines = c.cmd("MAIL FROM:<a@client.example.org>")
        assert code == 503, (code, lines)  # EHLO first
        c.ehlo()
        assert c.cmd("RCPT TO:<bob@example.test>")[0] == 503
        assert c.cmd("DATA")[0] == 503
        assert c.cmd("MAIL FROM:<a@client.example.org>")[0] == 250
        assert c.cmd("MAIL FROM:<a@client.example.org>")[0] == 503  # nested
        assert c.cmd("RSET") == (250, ["2.0.0 Ok"])
        assert c.cmd("RCPT TO:<bob@example.test>")[0] == 503  # RSET cleared the transaction


def test_every_reply_has_an_enhanced_code(server):
    """DESIGN: every reply carries an RFC 3463 code (except 220 greeting, EHLO/HELO and 354)."""
    # grouped so that no session reaches maxErrors (5)
    groups = [
        ["NOOP", "HELP", "VRFY bob", "EXPN staff", "FOO bar", "MAIL FROM:<bad address>", "RSET"],
        ["MAIL FROM:<a@client.example.org> FOO=BAR", "MAIL FROM:<a@client.example.org>", "RCPT TO:<>",
         "RCPT TO:<x@elsewhere.example.net>", "RCPT TO:<bob@example.test> BAR=1", "RCPT TO:<bob@example.test>"],
        ["AUTH PLAIN", "STARTTLS", "DATA", "QUIT"],
    ]
    for commands in groups:
        with session(server) as c:
            for cmd in commands:
                code, lines = c.cmd(cmd)
                for l in lines:
                    assert ENHANCED.match(l), (cmd, code, lines)
                assert int(lines[0][0]) == code // 100, (cmd, code, lines)


def test_postmaster_without_domain(server):
    with session(server) as c:
        assert c.cmd("MAIL FROM:<a@client.example.org>")[0] == 250
        code, lines = c.cmd("RCPT TO:<Postmaster>")
        assert code == 250, (code, lines)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: pm\r\n\r\nx\r\n.\r\n")
        code, lines = c.reply()
        assert code == 250
        qid = parse_queued_id(lines[0])
    env, _ = server.queue_show(qid)
    assert env["recipients"][0]["address"].lower() == f"postmaster@{HOSTNAME}"


def test_max_messages_per_connection(server):
    with session(server) as c:
        for i in range(3):
            start_data(c)
            c.send(b"Subject: n\r\n\r\nx\r\n.\r\n")
            assert c.reply()[0] == 250
        code, lines = c.cmd("MAIL FROM:<a@client.example.org>")
        assert code == 421 and lines[0].startswith("4."), (code, lines)
        assert c.is_closed()


def test_max_errors(server):
    with session(server) as c:
        replies = []
        for _ in range(10):
            try:
                replies.append(c.cmd("BOGUS"))
            except (EOFError, ConnectionResetError, BrokenPipeError):
                break
            if replies[-1][0] == 421:
                break
        codes = [r[0] for r in replies]
        assert codes[:5] == [500] * 5, replies
        # maxErrors 5: the 6th error ends the session with 421
        assert 421 in codes, replies
        assert replies[codes.index(421)][1][0].startswith("4.7.0")
        assert c.is_closed()


def test_max_connections_per_ip(server):
    held = [session(server) for _ in range(4)]
    try:
        with RawSMTP(server.port()) as c:
            code, lines = c.reply()
            assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)
            assert c.is_closed()
    finally:
        for h in held:
            h.cmd("QUIT")
            h.close()
    # once they are gone, connecting works again
    deadline = time.monotonic() + 5
    while True:
        with RawSMTP(server.port()) as c:
            code, _ = c.reply()
        if code == 220 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert code == 220
