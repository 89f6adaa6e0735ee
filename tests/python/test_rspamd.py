"""The `rspamd` plugin against a real rspamd (Debian's package, started here on loopback with its
stock rules): rspamd's GTUBE variants force each action, and the server must refuse, defer,
tag or rewrite exactly as the plugin's table says; with rspamd down the plugin fails open or
closed as configured."""

import os
import shutil
import smtplib
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, header_fields, parse_queued_id, split_received

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
GTUBE = "JS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# rspamd 3.x with enable_test_patterns: X... = reject, Y... = add header, Z... = rewrite
# subject, A... = no action.
REJECT, ADD_HEADER, REWRITE_SUBJECT, NO_ACTION = ("X" + GTUBE, "Y" + GTUBE, "Z" + GTUBE,
                                                  "A" + GTUBE)


class Rspamd:
    """rspamd with the system rules (/etc/rspamd) and a normal worker on a free loopback port;
    state, logs and the pid file in a temp dir; DNS pointed at a dead port so no check waits on
    the network."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.dir / "rspamd.conf").write_text(
            '.include "$CONFDIR/common.conf"\n'
            "options {\n"
            '  pidfile = "$RUNDIR/rspamd.pid";\n'
            '  .include "$CONFDIR/options.inc"\n'
            "  enable_test_patterns = true;\n"
            '  dns { nameserver = ["127.0.0.1:9"]; timeout = 0.2s; retransmits = 1; }\n'
            "}\n"
            'logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "notice"; }\n'
            'worker "normal" {\n'
            f'  bind_socket = "127.0.0.1:{self.port}";\n'
            '  .include "$CONFDIR/worker-normal.inc"\n'
            "  count = 1;\n"
            "}\n"
        )
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0):
        d = str(self.dir)
        args = [RSPAMD, "-f", "-c", str(self.dir / "rspamd.conf"), "--var", "CONFDIR=/etc/rspamd",
                "--var", f"LOCAL_CONFDIR={d}", "--var", f"RUNDIR={d}", "--var", f"DBDIR={d}",
                "--var", f"LOGDIR={d}"]
        if os.geteuid() == 0:
            args.insert(2, "-i")  # root in CI: let the workers run as root
        self.out = open(self.dir / "stdout.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT, cwd=d)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"rspamd exited: {self.log()}"
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=1) as r:
                    if r.read().strip() == b"pong":
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"rspamd did not answer /ping within {timeout}s: {self.log()}")

    def log(self) -> str:
        text = ""
        for name in ("stdout.log", "rspamd.log"):
            p = self.dir / name
            if p.exists():
                text += p.read_text(errors="replace")[-3000:]
        return text

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "out", None):
            self.out.close()


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory):
    r = Rspamd(tmp_path_factory.mktemp("rspamd"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def server(module_factory, rspamd):
    return module_factory.make(plugins=[{"rspamd": {"url": rspamd.url, "onError": "tempfail"}}])


def message(body: str, subject: str = "hello") -> bytes:
    return (f"From: <alice@client.example.org>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@client.example.org>\r\n\r\n{body}\r\n").encode()


def send(server, msg: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=30) as s:
        s.ehlo("client.example.org")
        s.mail("alice@client.example.org")
        s.rcpt("bob@example.test")
        code, text = s.data(msg)
        assert code == 250, (code, text)
        return parse_queued_id(text.decode())


def refused(server, msg: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=30) as s:
        s.ehlo("client.example.org")
        s.mail("alice@client.example.org")
        s.rcpt("bob@example.test")
        code, text = s.data(msg)
        assert code != 250, "accepted, expected a refusal"
        return code, text.decode()


def stored_headers(server, qid: str) -> list[tuple[str, str]]:
    _, stored = server.queue_show(qid)
    _, rest = split_received(stored)
    return header_fields(rest.split(b"\r\n\r\n", 1)[0] + b"\r\n")


def test_gtube_reject_is_refused_with_554(server, rspamd):
    code, text = refused(server, message(REJECT))
    assert code == 554 and text.startswith("5.7.1"), (code, text)
    assert server.metric("mailroom_plugin_rspamd_scans_total", listener="smtp", outcome="reject") >= 1


def test_add_header_tags_the_message(server):
    qid = send(server, message(ADD_HEADER))
    headers = dict(stored_headers(server, qid))
    assert headers.get("X-Spam") == "Yes", headers
    assert headers.get("X-Rspamd-Action") == "add header", headers
    assert " / " in headers.get("X-Rspamd-Score", ""), headers


def test_rewrite_subject_replaces_the_subject(server):
    qid = send(server, message(REWRITE_SUBJECT, subject="cheap pills"))
    fields = stored_headers(server, qid)
    subjects = [v for k, v in fields if k.lower() == "subject"]
    assert len(subjects) == 1, fields
    assert subjects[0] != "cheap pills" and "cheap pills" in subjects[0], subjects
    assert ("X-Rspamd-Action", "rewrite subject") in fields


def test_no_action_passes_with_the_score(server):
    qid = send(server, message(NO_ACTION))
    headers = dict(stored_headers(server, qid))
    assert headers.get("X-Rspamd-Action") == "no action", headers
    assert "X-Rspamd-Score" in headers and "X-Spam" not in headers, headers


def test_rspamd_down_fails_open_or_closed_as_configured(module_factory):
    dead = f"http://127.0.0.1:{free_port()}"
    closed = module_factory.make(plugins=[{"rspamd": {"url": dead, "onError": "tempfail", "timeout": "2s"}}])
    code, text = refused(closed, message("hi"))
    assert code == 451 and text.startswith("4.7.1"), (code, text)
    assert closed.metric("mailroom_plugin_rspamd_scans_total", listener="smtp", outcome="error") >= 1
    opened = module_factory.make(plugins=[{"rspamd": {"url": dead, "timeout": "2s"}}])
    qid = send(opened, message("hi"))
    assert "X-Rspamd-Action" not in dict(stored_headers(opened, qid))
