"""Mail reception through Python's smtplib on a plain mx listener."""

import re
import smtplib

import pytest

from conftest import HOSTNAME, IO_TIMEOUT, RawSMTP, header_fields, parse_queued_id, split_received

MAX_SIZE = 10 * 1024  # "10KiB"


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(limits={"maxMessageSize": "10KiB", "maxRecipients": 100})


def smtp(server) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.port(), local_hostname="client.example.org", timeout=IO_TIMEOUT)
    return s


def send(s: smtplib.SMTP, sender, rcpts, msg: bytes, mail_options=(), rcpt_options=()) -> str:
    """Sends one message with mail()/rcpt()/data() and returns the queue id of the 250 reply."""
    s.ehlo_or_helo_if_needed()
    code, resp = s.mail(sender, list(mail_options))
    assert (code, resp) == (250, b"2.1.0 Ok"), (code, resp)
    for r in rcpts:
        code, resp = s.rcpt(r, list(rcpt_options))
        assert (code, resp) == (250, b"2.1.5 Ok"), (r, code, resp)
    code, resp = s.data(msg)
    assert code == 250, (code, resp)
    return parse_queued_id(resp.decode())


MESSAGE = (
    b"From: Alice <alice@client.example.org>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: byte for byte\r\n"
    b"Message-ID: <m1@client.example.org>\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot (dot-stuffed on the wire)\r\n"
    b"..two dots\r\n"
    b".\tdot tab\r\n"
    b"trailing spaces   \r\n"
    b"\ttab-indented line\r\n"
    b"\r\n"
    b"\r\n"
    + b"x" * 900 + b"\r\n"
    b"8bit: caf\xc3\xa9 \xe2\x82\xac\r\n"
    b"last line\r\n"
)


def test_banner_and_ehlo(server):
    with RawSMTP(server.port()) as c:
        code, lines = c.banner()
        assert code == 220
        assert lines == [f"{HOSTNAME} ESMTP Mailroom"]
        code, lines = c.ehlo()
        exts = [l.split(" ", 1)[0] for l in lines[1:]]
        for e in ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING",
                  "BINARYMIME", "DSN", "HELP"):
            assert e in exts, (e, lines)
        assert f"SIZE {MAX_SIZE}" in lines
        assert "STARTTLS" not in exts and "AUTH" not in exts, lines


def test_plain_send_stored_byte_for_byte(server):
    with smtp(server) as s:
        qid = send(s, "alice@client.example.org", ["bob@example.test"], MESSAGE)
    env, stored = server.queue_show(qid)
    assert stored.endswith(MESSAGE)
    received, rest = split_received(stored)
    # Not authenticated, mx listener: nothing but our Received: precedes the client's bytes.
    assert rest == MESSAGE
    assert f"by {HOSTNAME} (Mailroom) with ESMTP id {qid}".encode() in received
    assert b"for <bob@example.test>" in received
    assert env["id"] == qid
    assert env["sender"] == "alice@client.example.org"
    assert [r["address"] for r in env["recipients"]] == ["bob@example.test"]
    assert env["recipients"][0]["domain"] == "example.test"
    assert env["helo"] == "client.example.org"
    assert env["client_ip"] == "127.0.0.1"
    assert env["auth_user"] is None
    assert env["message_id"] == "<m1@client.example.org>"
    assert env["smtputf8"] is False
    # The list view agrees.
    listed = {e["id"]: e for e in server.queue_list()}
    assert listed[qid]["sender"] == "alice@client.example.org"
    assert listed[qid]["recipients"] == 1
    assert listed[qid]["size"] == len(stored)


def test_sendmail_without_trailing_crlf(server):
    """smtplib appends the CRLF a message lacks before the final dot; that CRLF belongs to the
    message (RFC 5321 4.1.1.4), so the stored message ends with it."""
    msg = b"Subject: no final newline\r\n\r\nbody without newline"
    with smtp(server) as s:
        qid = send(s, "a@client.example.org", ["b@example.test"], msg)
    _, stored = server.queue_show(qid)
    assert split_received(stored)[1] == msg + b"\r\n"


def test_several_recipients(server):
    rcpts = ["one@example.test", "two@EXAMPLE.test", "three@example.test"]
    with smtp(server) as s:
        refused = s.sendmail("alice@client.example.org", rcpts, MESSAGE)
        assert refused == {}
        code, resp = s.noop()
        assert code == 250
    # find it: the newest message with 3 recipients
    entries = [e for e in server.queue_list() if e["recipients"] == 3]
    assert entries, server.queue_list()
    env, stored = server.queue_show(entries[-1]["id"])
    assert [r["address"] for r in env["recipients"]] == rcpts
    assert [r["domain"] for r in env["recipients"]] == ["example.test"] * 3
    assert split_received(stored)[1] == MESSAGE
    # Several recipients: no single "for <...>" clause.
    assert b"for <" not in split_received(stored)[0]


def test_several_recipients_one_refused(server):
    with smtp(server) as s:
        refused = s.sendmail("alice@client.example.org", ["ok@example.test", "bad@elsewhere.example.net"], MESSAGE)
    assert list(refused) == ["bad@elsewhere.example.net"]
    code, text = refused["bad@elsewhere.example.net"]
    assert code == 550 and text.startswith(b"5.7.1"), (code, text)


def test_relay_denied(server):
    with smtp(server) as s:
        s.ehlo()
        assert s.mail("alice@client.example.org") == (250, b"2.1.0 Ok")
        code, resp = s.rcpt("victim@gmail.example.com")
        assert code == 550, (code, resp)
        assert resp.startswith(b"5.7.1 "), resp
        with pytest.raises(smtplib.SMTPDataError) as ei:
            s.data(b"Subject: x\r\n\r\nx\r\n")
        assert ei.value.smtp_code == 554, ei.value  # no valid recipients
        assert s.rset()[0] == 250
        with pytest.raises(smtplib.SMTPRecipientsRefused) as ei:
            s.sendmail("alice@client.example.org", ["victim@gmail.example.com"], MESSAGE)
        assert ei.value.recipients["victim@gmail.example.com"][0] == 550


def test_null_sender(server):
    msg = b"Subject: bounce\r\n\r\nA delivery status notification.\r\n"
    with smtp(server) as s:
        s.ehlo()
        code, resp = s.docmd("MAIL FROM:<>")
        assert (code, resp) == (250, b"2.1.0 Ok")
        assert s.rcpt("postmaster@example.test")[0] == 250
        code, resp = s.data(msg)
        assert code == 250, (code, resp)
        qid = parse_queued_id(resp.decode())
        # smtplib's sendmail("") sends MAIL FROM:<> too
        refused = s.sendmail("", ["bob@example.test"], msg)
        assert refused == {}
    env, stored = server.queue_show(qid)
    assert env["sender"] == ""
    assert split_received(stored)[1] == msg


def test_smtputf8(server):
    sender = "usér@exämple.org"
    rcpt = "δοκιμή@example.test"
    msg = ("From: " + sender + "\r\nTo: " + rcpt + "\r\nSubject: ünïcödé\r\n\r\nΓειά σου κόσμε\r\n").encode()
    with smtp(server) as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        code, resp = s.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250, (code, resp)
        assert s.rcpt(rcpt)[0] == 250
        code, resp = s.data(msg)
        assert code == 250, (code, resp)
        qid = parse_queued_id(resp.decode())
    env, stored = server.queue_show(qid)
    assert env["smtputf8"] is True
    assert env["sender"] == sender
    assert [r["address"] for r in env["recipients"]] == [rcpt]
    assert env["body_type"] == "8BITMIME"
    received, rest = split_received(stored)
    assert rest == msg
    assert b"with UTF8SMTP id" in received


def test_non_ascii_address_without_smtputf8_refused(server):
    with RawSMTP(server.port()) as c:
        c.banner()
        c.ehlo()
        code, lines = c.cmd("MAIL FROM:<usér@example.org>".encode())
        assert code == 553 and lines[0].startswith("5.6.7"), (code, lines)
        code, lines = c.cmd("MAIL FROM:<user@example.org>")
        assert code == 250
        code, lines = c.cmd("RCPT TO:<δοκιμή@example.test>".encode())
        assert code == 553 and lines[0].startswith("5.6.7"), (code, lines)


def test_dsn_parameters_stored(server):
    with smtp(server) as s:
        s.ehlo()
        assert s.has_extn("dsn")
        refused = s.sendmail(
            "alice@client.example.org", ["bob@example.test", "carol@example.test"], MESSAGE,
            mail_options=["RET=HDRS", "ENVID=abc"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x@y"],
        )
        assert refused == {}
        # a second one with different parameters per recipient, ENVID in xtext
        assert s.mail("alice@client.example.org", ["RET=FULL", "ENVID=a+2Bb+3Dc"])[0] == 250
        assert s.rcpt("bob@example.test", ["NOTIFY=NEVER"])[0] == 250
        assert s.rcpt("carol@example.test", ["NOTIFY=DELAY", "ORCPT=rfc822;carol+2Bx@example.test"])[0] == 250
        assert s.rcpt("dave@example.test")[0] == 250
        code, resp = s.data(MESSAGE)
        assert code == 250
        qid2 = parse_queued_id(resp.decode())
    entries = [e for e in server.queue_list() if e["recipients"] == 2]
    env, _ = server.queue_show(entries[-1]["id"])
    assert env["ret"] == "HDRS"
    assert env["envid"] == "abc"
    for r in env["recipients"]:
        assert r["notify"] == {"never": False, "success": True, "failure": True, "delay": False}, r
        assert r["orcpt"] == {"addr_type": "rfc822", "addr": "x@y"}, r

    env, _ = server.queue_show(qid2)
    assert env["ret"] == "FULL"
    assert env["envid"] == "a+b=c"  # xtext-decoded
    bob, carol, dave = env["recipients"]
    assert bob["notify"] == {"never": True, "success": False, "failure": False, "delay": False}
    assert bob["orcpt"] is None
    assert carol["notify"] == {"never": False, "success": False, "failure": False, "delay": True}
    assert carol["orcpt"] == {"addr_type": "rfc822", "addr": "carol+x@example.test"}
    assert dave["notify"] is None and dave["orcpt"] is None


def test_vrfy(server):
    with smtp(server) as s:
        code, resp = s.verify("bob@example.test")
    assert code == 252, (code, resp)
    assert resp.startswith(b"2.5.0"), resp


def test_too_many_recipients(server):
    """maxRecipients is 100 (the minimum for mx listeners): the 101st RCPT gets 452 4.5.3 and
    the message still goes to the first 100."""
    rcpts = [f"r{i}@example.test" for i in range(101)]
    with smtp(server) as s:
        s.ehlo()
        assert s.mail("alice@client.example.org")[0] == 250
        for r in rcpts[:100]:
            assert s.rcpt(r) == (250, b"2.1.5 Ok")
        code, resp = s.rcpt(rcpts[100])
        assert code == 452, (code, resp)
        assert resp.startswith(b"4.5.3"), resp
        code, resp = s.data(MESSAGE)
        assert code == 250, (code, resp)
        qid = parse_queued_id(resp.decode())
    env, _ = server.queue_show(qid)
    assert [r["address"] for r in env["recipients"]] == rcpts[:100]


def test_size_parameter_too_large(server):
    with smtp(server) as s:
        s.ehlo()
        assert s.does_esmtp and int(s.esmtp_features["size"]) == MAX_SIZE
        code, resp = s.mail("alice@client.example.org", [f"SIZE={MAX_SIZE + 1}"])
        assert code == 552, (code, resp)
        assert resp.startswith(b"5.3.4"), resp
        # exactly the limit is fine
        code, resp = s.mail("alice@client.example.org", [f"SIZE={MAX_SIZE}"])
        assert code == 250, (code, resp)
        s.rset()
        # smtplib adds SIZE= itself: the big message is refused at MAIL
        big = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 200
        with pytest.raises(smtplib.SMTPSenderRefused) as ei:
            s.sendmail("alice@client.example.org", ["bob@example.test"], big)
        assert ei.value.smtp_code == 552


def test_oversized_message_sent_anyway(server):
    """A client that ignores SIZE and sends too much gets 552 5.3.4 after the final dot, and
    the connection stays usable."""
    big = b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 200  # ~14.4 kB > 10 KiB
    before = len(server.queue_list())
    with smtp(server) as s:
        s.ehlo()
        assert s.mail("alice@client.example.org") == (250, b"2.1.0 Ok")  # no SIZE=
        assert s.rcpt("bob@example.test")[0] == 250
        code, resp = s.data(big)
        assert code == 552, (code, resp)
        assert resp.startswith(b"5.3.4"), resp
        # same connection: the next message goes through
        code, resp = s.noop()
        assert code == 250
        qid = send(s, "alice@client.example.org", ["bob@example.test"], MESSAGE)
    _, stored = server.queue_show(qid)
    assert split_received(stored)[1] == MESSAGE
    assert len(server.queue_list()) == before + 1


def sized_message(n: int) -> bytes:
    head = b"Subject: exactly sized\r\n\r\n"
    body = head + (b"z" * 98 + b"\r\n") * ((n - len(head)) // 100)
    body += b"q" * (n - len(body) - 2) + b"\r\n"
    assert len(body) == n
    return body


@pytest.mark.parametrize("use_bdat", [False, True], ids=["DATA", "BDAT"])
def test_size_limit_boundary(server, use_bdat):
    """maxMessageSize limits the message as the client sent it (after dot-unstuffing): exactly
    the limit is accepted, one octet more is 552 5.3.4; our Received: header does not count."""
    with RawSMTP(server.port()) as c:
        c.banner()
        c.ehlo()
        for n, expect in [(MAX_SIZE, 250), (MAX_SIZE + 1, 552), (MAX_SIZE, 250)]:
            msg = sized_message(n)
            assert c.cmd("MAIL FROM:<alice@client.example.org>")[0] == 250
            assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
            if use_bdat:
                c.send(b"BDAT %d LAST\r\n" % n + msg)
            else:
                assert c.cmd("DATA")[0] == 354
                c.send(msg + b".\r\n")
            code, lines = c.reply()
            assert code == expect, (n, code, lines)
            if code == 552:
                assert lines[0].startswith("5.3.4"), lines
            else:
                qid = parse_queued_id(lines[0])
                assert split_received(server.queue_show(qid)[1])[1] == msg


@pytest.mark.parametrize("mail, rcpt", [
    ("MAIL FROM:<usér@client.example.org> SMTPUTF8", "δοκιμή@example.test"),
    ("MAIL FROM:<alice@client.example.org>", '"we(ird)[x]"@example.test'),
], ids=["utf8-local-part", "quoted-local-part"])
def test_received_for_clause_names_the_recipient(server, mail, rcpt):
    """RFC 5321 4.4: the optional FOR clause is the recipient's Mailbox; if the server cannot
    write it faithfully it should leave the clause out, not write another address."""
    with RawSMTP(server.port()) as c:
        c.banner()
        c.ehlo()
        assert c.cmd(mail.encode())[0] == 250
        assert c.cmd(f"RCPT TO:<{rcpt}>".encode())[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: for clause\r\n\r\nx\r\n.\r\n")
        code, lines = c.reply()
        assert code == 250
        qid = parse_queued_id(lines[0])
    env, stored = server.queue_show(qid)
    assert env["recipients"][0]["address"] == rcpt
    received = split_received(stored)[0].decode()
    m = re.search(r"\sfor <([^>]*)>", received)
    if m:
        assert m.group(1) == rcpt, received


def test_headers_not_added_for_unauthenticated_mx(server):
    msg = b"Subject: no id, no date\r\n\r\nbody\r\n"
    with smtp(server) as s:
        qid = send(s, "alice@client.example.org", ["bob@example.test"], msg)
    env, stored = server.queue_show(qid)
    assert split_received(stored)[1] == msg
    names = [n.lower() for n, _ in header_fields(stored)]
    assert "message-id" not in names and "date" not in names
    assert env["message_id"] is None
