"""Interoperability with swaks (the Swiss Army Knife for SMTP)."""

import re
import shutil
import subprocess

import pytest

from conftest import USERS, split_received

SWAKS = shutil.which("swaks")
pytestmark = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt-get install -y swaks)")

QUEUED = re.compile(r"<[-~]\s+250 2\.0\.0 Ok: queued as ([0-9A-HJKMNP-TV-Z]{26})")

DATA = (
    "From: swaks@client.example.org\n"
    "To: bob@example.test\n"
    "Subject: from swaks\n"
    "\n"
    "Hello from swaks.\n"
    ".a dotted line\n"
    "last\n"
)
# swaks converts LF to CRLF and always sends CRLF "." CRLF after the data, so the message it
# sends ends with one more empty line.
DATA_CRLF = DATA.replace("\n", "\r\n").encode() + b"\r\n"


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(listeners=[{"name": "smtp", "mode": "mx", "tls": True, "auth": True}])


def swaks(server, *args, data=DATA, tmp_path=None) -> tuple[subprocess.CompletedProcess, list[str]]:
    cmd = [SWAKS, "--server", "127.0.0.1", "--port", str(server.port()), "--helo", "client.example.org",
           "--from", "swaks@client.example.org", "--timeout", "15", "--data", data, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return p, QUEUED.findall(p.stdout)


def check_stored(server, qid, rcpts):
    env, stored = server.queue_show(qid)
    assert env["sender"] == "swaks@client.example.org"
    assert [r["address"] for r in env["recipients"]] == rcpts
    assert split_received(stored)[1] == DATA_CRLF
    return env, stored


def test_swaks_plain(server):
    p, ids = swaks(server, "--to", "bob@example.test")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(ids) == 1, p.stdout
    check_stored(server, ids[0], ["bob@example.test"])


def test_swaks_pipeline(server):
    p, ids = swaks(server, "--pipeline", "--to", "bob@example.test,carol@example.test")
    assert p.returncode == 0, p.stdout + p.stderr
    # swaks really pipelined: MAIL, RCPT, RCPT, DATA written before the first reply was read
    assert re.search(r" -> MAIL FROM:.*\n -> RCPT TO:.*\n -> RCPT TO:.*\n -> DATA\n<-  250 2\.1\.0 Ok\n"
                     r"<-  250 2\.1\.5 Ok\n<-  250 2\.1\.5 Ok\n<-  354 ", p.stdout), p.stdout
    assert len(ids) == 1, p.stdout
    check_stored(server, ids[0], ["bob@example.test", "carol@example.test"])


def test_swaks_relay_denied(server):
    p, ids = swaks(server, "--to", "someone@far-away.example.net")
    assert p.returncode != 0
    assert re.search(r"<\*\*\s+550 5\.7\.1", p.stdout), p.stdout
    assert ids == []


def test_swaks_starttls_auth_plain(server):
    p, ids = swaks(server, "-tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", USERS["alice"],
                   "--to", "someone@far-away.example.net")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "220 2.0.0 Ready to start TLS" in p.stdout
    assert re.search(r"<~\s+235 2\.7\.0", p.stdout), p.stdout
    assert len(ids) == 1, p.stdout
    env, stored = server.queue_show(ids[0])
    assert env["auth_user"] == "alice"
    assert b"with ESMTPSA" in split_received(stored)[0]
    # authenticated: the headers plugin may add Message-ID/Date, the client's bytes follow
    assert stored.endswith(DATA_CRLF)


def test_swaks_auth_wrong_password(server):
    p, ids = swaks(server, "-tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "nope",
                   "--to", "bob@example.test")
    assert p.returncode != 0
    assert re.search(r"<~\*\s+535 5\.7\.8", p.stdout), p.stdout
    assert ids == []
