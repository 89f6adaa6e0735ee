"""CHUNKING (BDAT, RFC 3030), BINARYMIME and PIPELINING over a raw socket."""

import pytest

from conftest import RawSMTP, parse_queued_id, split_received

MSG = (
    b"From: alice@client.example.org\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: chunked\r\n"
    b"\r\n"
    b".leading dot is not stuffed in BDAT\r\n"
    b"..two dots stay two dots\r\n"
    b".\r\n"
    b"the line above is a lone dot; BDAT has no end marker\r\n"
    b"caf\xc3\xa9\r\n"
)


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(limits={"maxMessageSize": "64KiB"})


def session(server) -> RawSMTP:
    c = RawSMTP(server.port())
    code, _ = c.banner()
    assert code == 220
    _, lines = c.ehlo()
    assert "CHUNKING" in lines and "BINARYMIME" in lines and "PIPELINING" in lines
    return c


def start_tx(c: RawSMTP, mail="MAIL FROM:<alice@client.example.org>", rcpt="RCPT TO:<bob@example.test>"):
    assert c.cmd(mail) == (250, ["2.1.0 Ok"])
    assert c.cmd(rcpt) == (250, ["2.1.5 Ok"])


def bdat(c: RawSMTP, chunk: bytes, last=False):
    c.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
    return c.reply()


def test_bdat_two_chunks_and_last(server):
    a, b = MSG[:50], MSG[50:]  # split in the middle of a line
    with session(server) as c:
        start_tx(c)
        assert bdat(c, a) == (250, [f"2.0.0 {len(a)} octets received"])
        assert bdat(c, b) == (250, [f"2.0.0 {len(b)} octets received"])
        code, lines = bdat(c, b"", last=True)
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
        # the connection stays usable
        assert c.cmd("NOOP")[0] == 250
    env, stored = server.queue_show(qid)
    assert split_received(stored)[1] == MSG
    assert env["sender"] == "alice@client.example.org"
    assert [r["address"] for r in env["recipients"]] == ["bob@example.test"]


def test_bdat_single_last_chunk(server):
    with session(server) as c:
        start_tx(c)
        code, lines = bdat(c, MSG, last=True)
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    assert split_received(server.queue_show(qid)[1])[1] == MSG


def test_bdat_crlf_split_across_chunks(server):
    """A chunk may end between CR and LF (RFC 3030 does not align chunks with lines)."""
    i = MSG.index(b"\r\n", 20) + 1  # just after a CR
    assert MSG[i - 1:i + 1] == b"\r\n"
    with session(server) as c:
        start_tx(c)
        assert bdat(c, MSG[:i])[0] == 250
        code, lines = bdat(c, MSG[i:], last=True)
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    assert split_received(server.queue_show(qid)[1])[1] == MSG


def test_bdat_binarymime(server):
    """BODY=BINARYMIME: bare LF/CR and NUL octets are data, stored as sent."""
    payload = (b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Transfer-Encoding: binary\r\n\r\n"
               b"bare LF\nbare CR\rNUL\x00 and utf-8 \xe2\x9c\x93 end")
    with session(server) as c:
        start_tx(c, mail="MAIL FROM:<alice@client.example.org> BODY=BINARYMIME")
        assert bdat(c, payload[:40])[0] == 250
        code, lines = bdat(c, payload[40:], last=True)
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    env, stored = server.queue_show(qid)
    assert env["body_type"] == "BINARYMIME"
    assert split_received(stored)[1] == payload


def test_bdat_binarymime_all_octets(server):
    """Every octet value survives; checked in the spool file since `queue show` prints text."""
    payload = b"Content-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) * 4
    with session(server) as c:
        start_tx(c, mail="MAIL FROM:<alice@client.example.org> BODY=BINARYMIME")
        code, lines = bdat(c, payload, last=True)
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
    env, stored = server.spool_file(qid)
    assert env["body_type"] == "BINARYMIME"
    assert split_received(stored)[1] == payload


def test_data_refused_with_binarymime(server):
    with session(server) as c:
        start_tx(c, mail="MAIL FROM:<alice@client.example.org> BODY=BINARYMIME")
        code, lines = c.cmd("DATA")
        assert code == 503, (code, lines)


def test_pipelined_mail_rcpt_bdat_in_one_write(server):
    with session(server) as c:
        c.send(b"MAIL FROM:<alice@client.example.org>\r\n"
               b"RCPT TO:<bob@example.test>\r\n"
               b"RCPT TO:<nobody@relay.example.net>\r\n"
               b"RCPT TO:<carol@example.test>\r\n"
               + b"BDAT %d LAST\r\n" % len(MSG) + MSG +
               b"MAIL FROM:<>\r\n"
               b"RCPT TO:<postmaster@example.test>\r\n"
               + b"BDAT %d LAST\r\n" % len(MSG) + MSG +
               b"QUIT\r\n")
        assert c.reply() == (250, ["2.1.0 Ok"])
        assert c.reply() == (250, ["2.1.5 Ok"])
        code, lines = c.reply()
        assert code == 550 and lines[0].startswith("5.7.1"), (code, lines)
        assert c.reply() == (250, ["2.1.5 Ok"])
        code, lines = c.reply()
        assert code == 250, (code, lines)
        q1 = parse_queued_id(lines[0])
        assert c.reply() == (250, ["2.1.0 Ok"])
        assert c.reply() == (250, ["2.1.5 Ok"])
        code, lines = c.reply()
        assert code == 250, (code, lines)
        q2 = parse_queued_id(lines[0])
        assert c.reply()[0] == 221
        assert c.is_closed()
    env, stored = server.queue_show(q1)
    assert [r["address"] for r in env["recipients"]] == ["bob@example.test", "carol@example.test"]
    assert split_received(stored)[1] == MSG
    env, stored = server.queue_show(q2)
    assert env["sender"] == ""
    assert split_received(stored)[1] == MSG


def test_pipelined_mail_rcpt_data_in_one_write(server):
    body = b"Subject: pipelined DATA\r\n\r\n..stuffed\r\nend\r\n"
    with session(server) as c:
        c.send(b"MAIL FROM:<alice@client.example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert c.reply() == (250, ["2.1.0 Ok"])
        assert c.reply() == (250, ["2.1.5 Ok"])
        assert c.reply()[0] == 354
        c.send(body + b".\r\nNOOP\r\n")
        code, lines = c.reply()
        assert code == 250, (code, lines)
        qid = parse_queued_id(lines[0])
        assert c.reply()[0] == 250  # the NOOP
    assert split_received(server.queue_show(qid)[1])[1] == b"Subject: pipelined DATA\r\n\r\n.stuffed\r\nend\r\n"


def test_bdat_without_transaction_consumes_chunk(server):
    """A refused BDAT chunk is still read, so its bytes are not taken for commands."""
    with session(server) as c:
        chunk = b"NOOP\r\nQUIT\r\n"
        c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        code, lines = c.reply()
        assert code == 503, (code, lines)
        start_tx(c)
        code, lines = bdat(c, MSG, last=True)
        assert code == 250, (code, lines)


def test_bdat_too_large(server):
    big = b"Subject: big\r\n\r\n" + (b"w" * 98 + b"\r\n") * 700  # 70 kB > 64 KiB
    with session(server) as c:
        start_tx(c)
        replies = []
        for i in range(0, len(big), 16384):
            chunk = big[i:i + 16384]
            replies.append(bdat(c, chunk, last=i + 16384 >= len(big)))
        codes = [r[0] for r in replies]
        assert 552 in codes, replies
        r552 = replies[codes.index(552)]
        assert r552[1][0].startswith("5.3.4"), r552
        # the session continues: a small message goes through
        start_tx(c)
        code, lines = bdat(c, MSG, last=True)
        assert code == 250, (code, lines)
