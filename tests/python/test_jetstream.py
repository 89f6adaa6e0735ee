"""`mailroom serve` with the JetStream queue against a real nats-server: 250 only after the
PubAck, one stream entry per destination domain, 451 (never 250) while NATS is down, /readyz
follows the connection, and the server recovers by itself when NATS is back."""

import glob
import os
import shutil
import signal
import smtplib
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, split_received


def nats_server_binary() -> str:
    env = os.environ.get("MAILROOM_NATS_SERVER")
    if env:
        return env
    base = Path(os.environ.get("MAILROOM_TOOLS_DIR", Path.home() / ".cache/mailroom/tools"))
    found = sorted(glob.glob(str(base / "*" / "bin" / "nats-server")))
    if found:
        return found[-1]
    which = shutil.which("nats-server")
    if which:
        return which
    pytest.fail("no nats-server binary: run e2e/tools/build.sh (make test does) or set MAILROOM_NATS_SERVER")


class Nats:
    def __init__(self, workdir: Path):
        self.bin = nats_server_binary()
        self.port = free_port()
        self.mon = free_port()
        self.store = workdir / "js"
        self.log = workdir / "nats.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [self.bin, "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.mon), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.mon}/healthz?js-enabled-only=true", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"nats-server did not become healthy: {self.log.read_text()[-2000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def nats(tmp_path):
    n = Nats(tmp_path)
    n.start()
    yield n
    n.stop()


def jetstream_server(factory, nats, **queue):
    spec = {"urls": [nats.url], "publishTimeout": "2s", **queue}
    return factory.make(acceptedDomains=["example.test", "other.test"], extra={"queue": {"jetstream": spec}})


def send(port, rcpts, body=b"Subject: js\r\n\r\nvia jetstream\r\n"):
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.example.org")
        code, resp = s.mail("sender@client.example.org")
        assert code == 250, resp
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, resp
        code, resp = s.data(body)
        return code, resp.decode()


def test_messages_go_to_the_stream_one_entry_per_domain(mailroom_factory, nats):
    server = jetstream_server(mailroom_factory, nats)
    body = b"Subject: js\r\n\r\nvia jetstream\r\n"
    code, resp = send(server.port(), ["a@example.test", "b@other.test", "c@example.test"], body)
    assert code == 250 and "queued as" in resp, resp
    qid = resp.rsplit(" ", 1)[-1]
    stats = server.queue_stats()
    assert stats["messages"] == 1, stats
    assert stats["by_domain"] == {"example.test": 1, "other.test": 1}, stats
    env, stored = server.queue_show(qid)
    assert sorted(r["address"] for r in env["recipients"]) == ["a@example.test", "b@other.test", "c@example.test"]
    assert split_received(stored)[1] == body
    assert server.http_get("/readyz")[0] == 200


def test_nats_down_gives_451_never_250_and_recovers(mailroom_factory, nats):
    server = jetstream_server(mailroom_factory, nats)
    assert send(server.port(), ["a@example.test"])[0] == 250
    nats.stop()
    # While NATS is down: 451 4.3.0, the connection stays usable, /readyz says not ready.
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=30) as s:
        s.ehlo("client.example.org")
        s.mail("sender@client.example.org")
        s.rcpt("a@example.test")
        code, resp = s.data(b"Subject: down\r\n\r\nx\r\n")
        assert code == 451 and resp.startswith(b"4.3.0"), (code, resp)
        assert s.noop()[0] == 250
    deadline = time.time() + 15
    while server.http_get("/readyz")[0] == 200 and time.time() < deadline:
        time.sleep(0.2)
    assert server.http_get("/readyz")[0] == 503
    nats.start()
    deadline = time.time() + 30
    while server.http_get("/readyz")[0] != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert server.http_get("/readyz")[0] == 200, "did not reconnect by itself"
    code, resp = send(server.port(), ["b@example.test"])
    assert code == 250, resp
    assert server.queue_stats()["messages"] == 2


def test_check_names_jetstream_fields(tmp_path):
    from conftest import MAILROOM_BIN
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "listeners:\n- name: smtp\n  address: 127.0.0.1:2525\n  acceptedDomains: [example.test]\n"
        "queue:\n  jetstream:\n    urls: [\"http://wrong\"]\n    replicas: 2\n"
    )
    p = subprocess.run([MAILROOM_BIN, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "queue.jetstream.urls[0]" in p.stderr, p.stderr
    assert "queue.jetstream.replicas" in p.stderr, p.stderr


def test_queue_delete_removes_every_entry(mailroom_factory, nats):
    server = jetstream_server(mailroom_factory, nats)
    code, resp = send(server.port(), ["a@example.test", "b@other.test"])
    assert code == 250, resp
    qid = resp.rsplit(" ", 1)[-1]
    assert server.queue_stats()["messages"] == 1
    p = server.queue_cli("delete", qid)
    assert f"deleted {qid}" in p.stdout.decode()
    assert server.queue_stats()["messages"] == 0
    again = server.queue_cli("delete", qid, check=False)
    assert again.returncode == 1 and "no message" in again.stderr.decode()


def test_queue_cli_backlog_bounce_retry_while_serving(mailroom_factory, nats):
    """Against JetStream the changing admin commands work while the server runs."""
    server = jetstream_server(mailroom_factory, nats)
    code, resp = send(server.port(), ["a@example.test", "b@other.test"])
    assert code == 250, resp
    qid = resp.rsplit(" ", 1)[-1]
    stats = server.queue_stats()
    assert stats["backend"] == "jetstream"
    assert stats["backlog"] == {"default": {"ready": 2, "deferred": 0, "leased": 0}}, stats
    assert 0 <= stats["oldest_age_seconds"] < 60
    p = server.queue_cli("retry", qid)
    assert p.stdout.startswith(b"0 deferred entries"), p.stdout
    p = server.queue_cli("bounce", qid, "--reason", "operator says no")
    assert p.stdout.startswith(b"2 entries"), p.stdout
    head, _ = server.queue_show_full(qid)
    assert sorted(e["domain"] for e in head["entries"]) == ["example.test", "other.test"]
    assert all(e["bounce_requested"] == "operator says no" for e in head["entries"]), head
    assert all(e["attempts"] == 0 for e in head["entries"])
    missing = server.queue_cli("bounce", "01ARZ3NDEKTSV4RRFFQ69G5FAV", check=False)
    assert missing.returncode == 1 and b"no message" in missing.stderr


def test_inbound_needs_the_cluster_queue_and_serves_with_it(tmp_path, nats):
    from conftest import MAILROOM_BIN
    local = tmp_path / "local.yaml"
    local.write_text("listeners:\n- name: smtp\n  address: 127.0.0.1:0\n  acceptedDomains: [example.test]\n")
    p = subprocess.run([MAILROOM_BIN, "inbound", "--config", str(local)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "queue.jetstream" in p.stderr, p.stderr

    smtp, http = free_port(), free_port()
    cfg = tmp_path / "inbound.yaml"
    cfg.write_text(
        f"listeners:\n- name: smtp\n  address: 127.0.0.1:{smtp}\n  acceptedDomains: [example.test]\n"
        f"queue:\n  jetstream:\n    urls: [\"{nats.url}\"]\nhttp:\n  address: 127.0.0.1:{http}\n"
        f"log:\n  deliveryLog: {tmp_path / 'delivery.jsonl'}\n"
    )
    proc = subprocess.Popen([MAILROOM_BIN, "inbound", "--config", str(cfg)], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        code, resp = send(smtp, ["a@example.test"])
        assert code == 250, resp
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
