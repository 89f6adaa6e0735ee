"""STARTTLS, implicit TLS, SMTP AUTH (PLAIN, LOGIN) and submission listeners."""

import base64
import os
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from conftest import HOSTNAME, IO_TIMEOUT, USERS, RawSMTP, header_fields, parse_queued_id, split_received

ALICE = "alice"
ALICE_PW = USERS["alice"]


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(listeners=[
        {"name": "smtp", "mode": "mx", "tls": True, "auth": True},
        {"name": "submission", "mode": "submission", "tls": True, "auth": True,
         "limits": {"maxRecipients": 10}},
        {"name": "smtps", "mode": "submission", "tls": "implicit", "auth": True},
        {"name": "plain", "mode": "mx"},  # no TLS, no AUTH
    ])


def connect(server, listener="smtp") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port(listener), local_hostname="client.example.org",
                        timeout=IO_TIMEOUT)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def starttls(s: smtplib.SMTP, ctx):
    s.ehlo()
    code, resp = s.starttls(context=ctx)
    assert code == 220, (code, resp)
    s.ehlo()


def test_auth_offered_only_after_starttls(server, ssl_context):
    with connect(server) as s:
        s.ehlo()
        assert "starttls" in s.esmtp_features
        assert "auth" not in s.esmtp_features, s.esmtp_features
        starttls(s, ssl_context)
        assert "starttls" not in s.esmtp_features, s.esmtp_features
        assert s.esmtp_features.get("auth", "").split() == ["PLAIN", "LOGIN"], s.esmtp_features
        assert isinstance(s.sock, ssl.SSLSocket)
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        # STARTTLS again over TLS is refused
        code, resp = s.docmd("STARTTLS")
        assert code == 503, (code, resp)


def test_no_starttls_nor_auth_without_tls_config(server):
    with connect(server, "plain") as s:
        s.ehlo()
        assert "starttls" not in s.esmtp_features
        assert "auth" not in s.esmtp_features
        code, resp = s.docmd("STARTTLS")
        assert code == 502, (code, resp)


def test_auth_plain_after_starttls(server, ssl_context):
    msg = b"From: alice@client.example.org\r\nSubject: hi\r\n\r\nauthenticated mail\r\n"
    with connect(server) as s:
        starttls(s, ssl_context)
        code, resp = s.login(ALICE, ALICE_PW)  # smtplib picks PLAIN (first it supports)
        assert (code, resp[:5]) == (235, b"2.7.0"), (code, resp)
        # authenticated clients may relay to any domain, even on an mx listener
        assert s.mail("alice@client.example.org") == (250, b"2.1.0 Ok")
        assert s.rcpt("someone@far-away.example.net") == (250, b"2.1.5 Ok")
        code, resp = s.data(msg)
        assert code == 250, (code, resp)
        qid = parse_queued_id(resp.decode())
    env, stored = server.queue_show(qid)
    assert env["auth_user"] == ALICE
    assert env["listener"] == "smtp"
    assert env["recipients"][0]["domain"] == "far-away.example.net"
    received, rest = split_received(stored)
    assert b"with ESMTPSA id " + qid.encode() in received
    assert rest.endswith(msg)


def test_auth_plain_without_initial_response(server, ssl_context):
    with connect(server) as s:
        starttls(s, ssl_context)
        s.user, s.password = ALICE, ALICE_PW
        code, resp = s.auth("PLAIN", s.auth_plain, initial_response_ok=False)
        assert code == 235, (code, resp)


@pytest.mark.parametrize("initial_response_ok", [True, False])
def test_auth_login_after_starttls(server, ssl_context, initial_response_ok):
    with connect(server) as s:
        starttls(s, ssl_context)
        s.user, s.password = "bob", USERS["bob"]
        code, resp = s.auth("LOGIN", s.auth_login, initial_response_ok=initial_response_ok)
        assert (code, resp[:5]) == (235, b"2.7.0"), (code, resp)
        refused = s.sendmail("bob@client.example.org", ["x@other.example.net"], b"Subject: login\r\n\r\nx\r\n")
        assert refused == {}


def test_auth_before_tls_is_538(server):
    with RawSMTP(server.port("smtp")) as c:
        c.banner()
        c.ehlo()
        code, lines = c.cmd("AUTH PLAIN " + b64(f"\0{ALICE}\0{ALICE_PW}"))
        assert code == 538, (code, lines)
        assert lines[0].startswith("5.7.11 "), lines
        code, lines = c.cmd("AUTH LOGIN")
        assert code == 538, (code, lines)
        # still not authenticated: relaying is refused
        assert c.cmd("MAIL FROM:<alice@client.example.org>")[0] == 250
        code, lines = c.cmd("RCPT TO:<x@far-away.example.net>")
        assert code == 550 and lines[0].startswith("5.7.1"), (code, lines)


def test_wrong_password_is_535(server, ssl_context):
    with connect(server) as s:
        starttls(s, ssl_context)
        for user, pw in [(ALICE, "wrong"), ("nobody", "x"), (ALICE, USERS["bob"])]:
            with pytest.raises(smtplib.SMTPAuthenticationError) as ei:
                s.user, s.password = user, pw
                s.auth("PLAIN", s.auth_plain)
            assert ei.value.smtp_code == 535, ei.value
            assert ei.value.smtp_error.startswith(b"5.7.8"), ei.value
        s.user, s.password = ALICE, "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as ei:
            s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert ei.value.smtp_code == 535
        # not authenticated: no relaying
        s.mail("alice@client.example.org")
        assert s.rcpt("x@far-away.example.net")[0] == 550
        s.rset()
        # the right password still works on the same connection
        code, _ = s.login(ALICE, ALICE_PW)
        assert code == 235


def test_submission_mail_before_auth_is_530(server, ssl_context):
    with connect(server, "submission") as s:
        s.ehlo()
        code, resp = s.mail("alice@client.example.org")
        assert code == 530 and resp.startswith(b"5.7.0"), (code, resp)
        starttls(s, ssl_context)
        code, resp = s.mail("alice@client.example.org")
        assert code == 530 and resp.startswith(b"5.7.0"), (code, resp)
        code, resp = s.rcpt("bob@example.test")
        assert code == 503, (code, resp)


def test_submission_after_auth_relays_and_adds_headers(server, ssl_context):
    msg = b"From: alice@client.example.org\r\nTo: friend@gmail.example.com\r\nSubject: sub\r\n\r\nhello\r\n"
    with connect(server, "submission") as s:
        starttls(s, ssl_context)
        assert s.login(ALICE, ALICE_PW)[0] == 235
        refused = s.sendmail("alice@client.example.org", ["friend@gmail.example.com", "bob@example.test"], msg)
        assert refused == {}
    entries = [e for e in server.queue_list() if e["domains"] == ["example.test", "gmail.example.com"]]
    assert len(entries) == 1, entries
    env, stored = server.queue_show(entries[0]["id"])
    assert env["auth_user"] == ALICE
    assert env["listener"] == "submission"
    received, rest = split_received(stored)
    assert b"with ESMTPSA" in received
    assert rest.endswith(msg), rest
    added = rest[: len(rest) - len(msg)]
    fields = dict((n.lower(), v) for n, v in header_fields(added))
    assert set(fields) == {"message-id", "date"}, added
    assert fields["message-id"].startswith("<") and fields["message-id"].endswith(">"), fields
    assert "@" in fields["message-id"]
    from email.utils import parsedate_to_datetime
    assert parsedate_to_datetime(fields["date"]) is not None
    assert env["message_id"] == fields["message-id"]


def test_submission_keeps_existing_message_id_and_date(server, ssl_context):
    msg = (b"Message-ID: <own@client.example.org>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
           b"Subject: has both\r\n\r\nbody\r\n")
    with connect(server, "submission") as s:
        starttls(s, ssl_context)
        s.login(ALICE, ALICE_PW)
        s.mail("alice@client.example.org")
        s.rcpt("friend@gmail.example.com")
        code, resp = s.data(msg)
        assert code == 250, (code, resp)
        qid = parse_queued_id(resp.decode())
    env, stored = server.queue_show(qid)
    assert split_received(stored)[1] == msg
    assert env["message_id"] == "<own@client.example.org>"


def test_implicit_tls(server, ssl_context):
    msg = b"Subject: implicit\r\n\r\nover implicit TLS\r\n"
    with smtplib.SMTP_SSL("127.0.0.1", server.port("smtps"), local_hostname="client.example.org",
                          timeout=IO_TIMEOUT, context=ssl_context) as s:
        code, _ = s.ehlo()
        assert code == 250
        assert "starttls" not in s.esmtp_features
        assert s.esmtp_features.get("auth", "").split() == ["PLAIN", "LOGIN"]
        code, resp = s.mail("alice@client.example.org")
        assert code == 530, (code, resp)
        assert s.login(ALICE, ALICE_PW)[0] == 235
        s.mail("alice@client.example.org")
        s.rcpt("someone@far-away.example.net")
        code, resp = s.data(msg)
        assert code == 250, (code, resp)
        qid = parse_queued_id(resp.decode())
    env, stored = server.queue_show(qid)
    assert env["listener"] == "smtps"
    assert env["auth_user"] == ALICE
    received, rest = split_received(stored)
    assert b"with ESMTPSA" in received
    assert rest.endswith(msg)


def test_implicit_tls_banner(server, ssl_context):
    sock = ssl_context.wrap_socket(
        socket.create_connection(("127.0.0.1", server.port("smtps")), timeout=IO_TIMEOUT),
        server_hostname="127.0.0.1")
    with RawSMTP(0, sock=sock) as c:
        code, lines = c.banner()
        assert (code, lines) == (220, [f"{HOSTNAME} ESMTP Mailroom"])


def test_starttls_discards_pipelined_plaintext(server, ssl_context):
    """Commands pipelined after STARTTLS in the same packet must not be executed after the
    handshake (CVE-2011-0411 class)."""
    with RawSMTP(server.port("smtp")) as c:
        c.banner()
        c.ehlo()
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        code, lines = c.reply()
        assert code == 220, (code, lines)
        assert c.buf == b""
        tls = ssl_context.wrap_socket(c.sock, server_hostname="127.0.0.1")
        t = RawSMTP(0, sock=tls)
        code, lines = t.cmd("EHLO client.example.org")
        assert code == 250, (code, lines)  # not the reply to the injected MAIL
        code, lines = t.cmd("MAIL FROM:<alice@client.example.org>")
        assert code == 250, (code, lines)  # would be 503 nested MAIL if the injected one ran
        t.cmd("QUIT")
        t.close()


def make_cert(d, cn: str):
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt"), "-days", "2", "-subj", f"/CN={cn}"],
                   check=True, capture_output=True, timeout=60)
    return d / "tls.crt", d / "tls.key"


def served_cert(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with RawSMTP(port) as c:
        c.banner()
        c.ehlo()
        assert c.cmd("STARTTLS")[0] == 220
        tls = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
        der = tls.getpeercert(binary_form=True)
        tls.close()
    return der


def test_certificate_files_reloaded(mailroom_factory, tmp_path):
    """The cert/key files are re-read when they change (tls.reloadInterval)."""
    live = tmp_path / "live"
    cert, key = make_cert(live, "first.example.test")
    server = mailroom_factory.make(tls={"certFile": str(cert), "keyFile": str(key), "reloadInterval": "1s"})
    first = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert served_cert(server.port()) == first
    new_cert, new_key = make_cert(tmp_path / "next", "second.example.test")
    second = ssl.PEM_cert_to_DER_cert(new_cert.read_text())
    # replace both files the way a Secret volume update does: atomically, key first
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    deadline = time.monotonic() + 8
    got = first
    while time.monotonic() < deadline:
        got = served_cert(server.port())
        if got == second:
            break
        time.sleep(0.25)
    assert got == second, "new certificate not served within 8s (reloadInterval 1s)"
