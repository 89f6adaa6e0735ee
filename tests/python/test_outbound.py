"""Outbound delivery end to end: `mailroom serve` with a delivery policy that resolves MX records
through a real DNS server on loopback (dnsmasq) and delivers to real SMTP peers listening on
other loopback addresses (127.0.0.x, all routed to `lo` on Linux) at the policy's `mxPort`:
Postfix's smtp-sink (which dumps each transaction to a file, or rejects commands with 4xx/5xx),
and, where replies must change from one RCPT to the next, a small scripted SMTP responder that
records when each RCPT arrives.

Covered: delivery through the MX record; MX preference with fallback past a refused connection;
4xx deferral on the retry schedule, the state `mailroom queue show` reports meanwhile, and the
later delivery; 5xx bounce with an RFC 3464 report delivered, from the null sender, via the MX
of the sender's domain; null MX (RFC 7505) bounced at once with 5.1.10; a report that cannot
be delivered is dropped, never bounced again; expiry after `retry.maxAge`; delivered, bounced
and deferred recipients in one transaction; and a pooled connection that the peer closed while
idle is replaced by a fresh one instead of deferring the next message.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import socketserver
import subprocess
import threading
import time
from datetime import datetime
from email import message_from_bytes, policy as email_policy
from pathlib import Path

import pytest

from conftest import RawSMTP, free_port, parse_queued_id

SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "sender@client.test"

# ---------------------------------------------------------------------------------------------
# Peers


def mx_port(ips: list[str]) -> int:
    """One TCP port that is free on every address of `ips` (the policy has a single mxPort)."""
    for _ in range(50):
        port = free_port()
        try:
            for ip in ips:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((ip, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on all of {ips}")


def wait_banner(ip: str, port: int, alive, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    why = ""
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"SMTP peer on {ip}:{port} exited during startup")
        try:
            with RawSMTP(port, host=ip, timeout=2.0) as c:
                code, lines = c.banner()
                assert code == 220, (code, lines)
                c.cmd("QUIT")
                return
        except (OSError, EOFError) as e:
            why = str(e)
            time.sleep(0.05)
    raise AssertionError(f"SMTP peer on {ip}:{port} did not greet within {timeout}s: {why}")


class SmtpSink:
    """Postfix's smtp-sink on ip:port. Accepting, it writes every transaction to its own file
    (-d); with `args` such as ["-f", "RCPT", "-B", "550 ..."] it rejects commands."""

    def __init__(self, workdir: Path, ip: str, port: int, args: tuple = ()):
        if not os.access(SMTP_SINK, os.X_OK):
            pytest.fail(f"{SMTP_SINK} not installed (Debian package postfix): run scripts/test-deps.sh")
        self.dir = workdir / f"sink-{ip}"
        self.dumps = self.dir / "dumps"
        self.dumps.mkdir(parents=True)
        self.ip, self.port = ip, port
        cmd = [SMTP_SINK]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # required when run by root
        cmd += ["-h", f"sink-{ip}", "-d", f"{self.dumps}/msg.", *args, f"{ip}:{port}", "100"]
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=self.dir,
                                         start_new_session=True)
        wait_banner(ip, port, lambda: self.proc.poll() is None)

    def messages(self) -> list[dict]:
        """Each dumped transaction: {mail_from, rcpts, message} (message: LF line ends)."""
        out = []
        for f in sorted(self.dumps.iterdir()):
            text = f.read_text(errors="replace")
            lines = text.split("\n")
            meta: dict = {"rcpts": []}
            i = 0
            while i < len(lines) and lines[i].startswith("X-"):
                name, _, value = lines[i].partition(": ")
                if name == "X-Mail-Args":
                    meta["mail_args"] = value
                elif name == "X-Rcpt-Args":
                    meta["rcpts"].append(value)
                i += 1
            if i >= len(lines) or not lines[i].startswith("Received: "):
                continue  # still being written
            i += 1
            while i < len(lines) and lines[i][:1] in ("\t", " "):
                i += 1
            meta["message"] = "\n".join(lines[i:])
            meta["file"] = f
            out.append(meta)
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


class ScriptedReceiver:
    """A small SMTP server on ip:port whose RCPT replies come from `rcpt_replies` (the n-th RCPT
    it receives gets rcpt_replies[n], the last one repeating). It records every RCPT with its
    time and reply, and the messages it accepted. No PIPELINING, no STARTTLS."""

    def __init__(self, ip: str, port: int, rcpt_replies: list[str]):
        self.rcpt_replies = rcpt_replies
        self.rcpts: list[tuple[float, str, str]] = []  # (monotonic time, address, reply)
        self.messages: list[dict] = []
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                with receiver.lock:
                    receiver.conns.append(self.connection)
                try:
                    receiver.session(self.rfile, self.wfile)
                finally:
                    with receiver.lock:
                        if self.connection in receiver.conns:
                            receiver.conns.remove(self.connection)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((ip, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        wait_banner(ip, port, self.thread.is_alive)

    def session(self, rfile, wfile):
        def reply(text: str):
            wfile.write(text.encode() + b"\r\n")
            wfile.flush()

        reply("220 scripted ESMTP")
        mail_from, rcpts = None, []
        while True:
            line = rfile.readline(4096)
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                reply("250-scripted\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME")
            elif verb == "HELO":
                reply("250 scripted")
            elif verb == "MAIL":
                mail_from, rcpts = cmd[len("MAIL FROM:"):], []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                address = cmd[len("RCPT TO:"):].split(" ", 1)[0].strip("<>")
                with self.lock:
                    n = len(self.rcpts)
                    answer = self.rcpt_replies[min(n, len(self.rcpt_replies) - 1)]
                    self.rcpts.append((time.monotonic(), address, answer))
                if answer.startswith("2"):
                    rcpts.append(address)
                reply(answer)
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    reply("554 5.5.1 Error: no valid recipients")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                data = []
                while True:
                    l = rfile.readline(1 << 20)
                    if not l or l == b".\r\n":
                        break
                    data.append(l[1:] if l.startswith(b".") else l)
                with self.lock:
                    self.messages.append({"mail_from": mail_from, "rcpts": rcpts, "data": b"".join(data)})
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok: queued")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                return
            else:
                reply("502 5.5.2 Error: command not recognized")

    def close_connections(self, reply: str | None = "421 4.4.2 scripted Error: timeout exceeded") -> int:
        """Closes every open connection from the server side (after `reply`, if any); returns how many."""
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                if reply:
                    c.sendall(reply.encode() + b"\r\n")
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(conns)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def peers(tmp_path):
    """Starts SMTP peers (`peers.sink(ip, port, *args)`, `peers.scripted(ip, port, replies)`);
    all are stopped at teardown."""

    class Peers:
        def __init__(self):
            self.started = []

        def sink(self, ip, port, *args) -> SmtpSink:
            s = SmtpSink(tmp_path, ip, port, args)
            self.started.append(s)
            return s

        def scripted(self, ip, port, replies) -> ScriptedReceiver:
            r = ScriptedReceiver(ip, port, replies)
            self.started.append(r)
            return r

    p = Peers()
    yield p
    for s in reversed(p.started):
        s.stop()


# ---------------------------------------------------------------------------------------------
# The sending server


def delivery_policy(dns, port: int, **overrides) -> dict:
    policy = {
        "name": "default",
        "resolver": {"nameservers": [dns.nameserver]},
        "mxPort": port,
        "allowPrivateDestinations": True,
        "retry": {"schedule": ["1s"], "maxAge": "1h"},
        "timeouts": {"connect": "5s", "greeting": "10s", "command": "10s", "dataStart": "10s",
                     "dataBlock": "10s", "dataEnd": "10s"},
    }
    policy.update(overrides)
    return policy


def sending_server(factory, dns, port: int, domains: list[str], **policy):
    return factory.make(acceptedDomains=domains, extra={"policies": [delivery_policy(dns, port, **policy)]})


def send(server, rcpts: list[str], body: bytes, sender: str = SENDER) -> str:
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=15) as s:
        s.ehlo("client.test")
        code, resp = s.mail(sender)
        assert code == 250, resp
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, (r, resp)
        code, resp = s.data(body)
        assert code == 250, resp
        return parse_queued_id(resp.decode())


def message(subject: str, to: str, text: str) -> bytes:
    return (f"From: Sender <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
            f"\r\n{text}").encode()


def events(server, event: str | None = None) -> list[dict]:
    """Delivery-log lines (a line being written at the moment is skipped)."""
    if not server.delivery_log.exists():
        return []
    out = []
    for line in server.delivery_log.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or e.get("event") == event:
            out.append(e)
    return out


def diagnostics(server, dns=None) -> str:
    text = "\n--- delivery log ---\n" + "\n".join(json.dumps(e) for e in events(server))
    text += f"\n--- mailroom stderr (tail) ---\n{server.stderr_text()[-4000:]}"
    if dns is not None:
        text += f"\n--- dnsmasq log (tail) ---\n{dns.log_text()[-2000:]}"
    return text


def wait_for(what: str, fn, timeout: float, server=None, dns=None, interval: float = 0.05):
    """Polls fn() until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (diagnostics(server, dns) if server else ""))
        time.sleep(interval)


def queue_empty(server) -> bool:
    return server.queue_stats()["messages"] == 0


def without_received(message: str) -> str:
    """The message minus its first header field (the Received: the sending server added)."""
    assert message.startswith("Received: "), message[:300]
    lines = message.split("\n")
    i = 1
    while lines[i][:1] in ("\t", " "):
        i += 1
    return "\n".join(lines[i:])


def lf(b: bytes) -> str:
    return b.decode().replace("\r\n", "\n")


# ---------------------------------------------------------------------------------------------
# Tests


def test_delivery_through_the_mx_record(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")]}, hosts={"mx1.dest.test": "127.0.0.2"})
    sink = peers.sink("127.0.0.2", port)
    server = sending_server(mailroom_factory, dns, port, ["dest.test"])

    text = ("Hello over MX.\r\n.a line that starts with a dot\r\n" + "x" * 900 + "\r\n"
            "caf\u00e9 8bit line\r\nlast line\r\n")
    body = message("mx delivery", "rcpt@dest.test", text)
    started = time.monotonic()
    qid = send(server, ["rcpt@dest.test"], body)

    got = wait_for("the message at the sink on 127.0.0.2", sink.messages, 15, server, dns)
    elapsed = time.monotonic() - started
    assert len(got) == 1, got
    m = got[0]
    assert m["mail_args"].split(" ")[0] == f"<{SENDER}>", m
    assert [r.split(" ")[0] for r in m["rcpts"]] == ["<rcpt@dest.test>"], m
    # The body arrives intact (dot-stuffing undone, the long and 8-bit lines unchanged) below
    # the one Received: field the sending server added.
    assert without_received(m["message"]).rstrip("\n") == lf(body).rstrip("\n")
    received = m["message"].split("\n", 4)
    assert received[0] == "Received: from client.test ([127.0.0.1])", received
    assert received[1].strip() == f"by mail.example.test (Mailroom) with ESMTP id {qid}", received

    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    [d] = wait_for("the delivery line", lambda: events(server, "delivery"), 5, server, dns)
    assert d["queue_id"] == qid and d["recipient"] == "rcpt@dest.test" and d["sender"] == SENDER, d
    assert d["domain"] == "dest.test" and d["policy"] == "default", d
    assert d["host"] == "mx1.dest.test" and d["ip"] == "127.0.0.2", d
    assert d["response"].startswith("250"), d
    assert not events(server, "transient_failure") and not events(server, "bounce"), diagnostics(server)
    assert elapsed < 10, f"delivery took {elapsed:.1f}s"
    # The worker asked our DNS server, not the system's.
    assert "query[MX] dest.test" in dns.log_text()


def test_mx_preference_and_fallback_to_the_next_host(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2", "127.0.0.3"])
    dns = dnsmasq(mx={"fallback.test": [(20, "mx2.fallback.test"), (10, "mx1.fallback.test")]},
                  hosts={"mx1.fallback.test": "127.0.0.3", "mx2.fallback.test": "127.0.0.2"})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.3", port), timeout=2).close()
    sink = peers.sink("127.0.0.2", port)
    server = sending_server(mailroom_factory, dns, port, ["fallback.test"])

    body = message("fallback", "rcpt@fallback.test", "via the second MX\r\n")
    qid = send(server, ["rcpt@fallback.test"], body)

    got = wait_for("the message at the MX 20 sink", sink.messages, 15, server, dns)
    assert without_received(got[0]["message"]).rstrip("\n") == lf(body).rstrip("\n")
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    [d] = events(server, "delivery")
    assert d["queue_id"] == qid and d["host"] == "mx2.fallback.test" and d["ip"] == "127.0.0.2", d
    # In the same attempt: first the preferred host (refused), then the next; no deferral.
    assert not events(server, "transient_failure"), diagnostics(server)
    tried = [l for l in server.stderr_text().splitlines() if "trying the next host" in l]
    assert tried and "127.0.0.3" in tried[0] and "mx1.fallback.test" in tried[0], diagnostics(server)


def test_4xx_is_retried_on_the_schedule_then_delivered(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2"])
    dns = dnsmasq(mx={"slow.test": [(10, "mx.slow.test")]}, hosts={"mx.slow.test": "127.0.0.2"})
    receiver = peers.scripted("127.0.0.2", port, ["451 4.7.1 Greylisted, try again (1)",
                                                  "451 4.7.1 Greylisted, try again (2)",
                                                  "250 2.1.5 Ok"])
    server = sending_server(mailroom_factory, dns, port, ["slow.test"],
                            retry={"schedule": ["1s", "2s"], "maxAge": "1h"})
    body = message("retry", "rcpt@slow.test", "delivered on the third attempt\r\n")
    qid = send(server, ["rcpt@slow.test"], body)

    # While deferred, `queue show` has the attempts, the last response and the next attempt.
    wait_for("the first RCPT", lambda: receiver.rcpts, 10, server, dns)

    def deferred():
        entries = server.queue_show_full(qid)[0]["entries"]
        return entries if entries and entries[0]["attempts"] >= 1 else None

    [entry] = wait_for("attempts >= 1 in `queue show`", deferred, 10, server, dns)
    n = entry["attempts"]
    assert n in (1, 2), entry
    assert entry["domain"] == "slow.test" and entry["recipients"] == ["rcpt@slow.test"], entry
    assert entry["last_response"].startswith("451") and f"try again ({n})" in entry["last_response"], entry
    last = datetime.fromisoformat(entry["last_attempt_at"])
    wait = (datetime.fromisoformat(entry["next_attempt_at"]) - last).total_seconds()
    assert abs(wait - n) < 0.5, f"next attempt {wait:.2f}s after attempt {n} (schedule: 1s, 2s): {entry}"
    assert entry["bounce_requested"] is None, entry

    wait_for("the delivery", lambda: receiver.messages, 15, server, dns)
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)

    times = [t for t, _, _ in receiver.rcpts]
    assert [r[2][:3] for r in receiver.rcpts] == ["451", "451", "250"], receiver.rcpts
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.95 <= gaps[0] <= 2.0, f"second attempt {gaps[0]:.2f}s after the first (schedule: 1s)"
    assert 1.95 <= gaps[1] <= 3.0, f"third attempt {gaps[1]:.2f}s after the second (schedule: 2s)"
    [m] = receiver.messages
    assert m["rcpts"] == ["rcpt@slow.test"] and m["mail_from"].startswith(f"<{SENDER}>"), m
    assert without_received(lf(m["data"])).rstrip("\n") == lf(body).rstrip("\n")

    failures = events(server, "transient_failure")
    assert [f["attempts"] for f in failures] == [1, 2], diagnostics(server)
    for i, f in enumerate(failures, 1):
        assert f["queue_id"] == qid and f["recipient"] == "rcpt@slow.test", f
        assert f["response"].startswith("451") and f"try again ({i})" in f["response"], f
        assert f["host"] == "mx.slow.test" and f["ip"] == "127.0.0.2", f
        assert isinstance(f["next_attempt_ms"], int), f
    [d] = events(server, "delivery")
    assert d["queue_id"] == qid and d["response"].startswith("250"), d
    assert not events(server, "bounce"), diagnostics(server)


def dsn_parts(raw: str):
    """(message, [parts]) of a dumped multipart/report (LF line ends restored to CRLF)."""
    msg = message_from_bytes(raw.replace("\n", "\r\n").encode(), policy=email_policy.default)
    return msg, list(msg.iter_parts())


def test_5xx_bounces_with_a_dsn_to_the_senders_mx(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2", "127.0.0.4"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")], "client.test": [(10, "mx.client.test")]},
                  hosts={"mx1.dest.test": "127.0.0.2", "mx.client.test": "127.0.0.4"})
    rejection = "550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown in local table"
    peers.sink("127.0.0.2", port, "-f", "RCPT", "-B", rejection)
    sender_mx = peers.sink("127.0.0.4", port)
    server = sending_server(mailroom_factory, dns, port, ["dest.test"])

    body = message("doomed", "nobody@dest.test", "this one bounces\r\n")
    qid = send(server, ["nobody@dest.test"], body)

    [dsn] = wait_for("the DSN at the sender domain's MX", sender_mx.messages, 15, server, dns)
    assert dsn["mail_args"].split(" ")[0] == "<>", f"DSN not sent from the null sender: {dsn['mail_args']}"
    assert [r.split(" ")[0] for r in dsn["rcpts"]] == [f"<{SENDER}>"], dsn
    raw = dsn["message"]  # generated here: no Received: field
    msg, parts = dsn_parts(raw)
    assert msg["To"].addresses[0].addr_spec == SENDER, msg["To"]
    assert msg.get_content_type() == "multipart/report", msg["Content-Type"]
    assert msg.get_param("report-type") == "delivery-status", msg["Content-Type"]
    assert msg["From"].addresses[0].addr_spec.lower() == "mailer-daemon@mail.example.test", msg["From"]
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"], parts
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; nobody@dest.test" in status, status
    assert "Action: failed" in status and "Status: 5.1.1" in status, status
    assert "Remote-MTA: dns; mx1.dest.test" in status, status
    assert "User unknown in local table" in raw and "nobody@dest.test" in parts[0].get_content(), raw
    assert "this one bounces" in raw, "the original message is returned"

    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    [b] = events(server, "bounce")
    assert b["queue_id"] == qid and b["recipient"] == "nobody@dest.test", b
    assert b["response"].startswith("550") and "User unknown" in b["response"], b
    assert b["host"] == "mx1.dest.test" and b["ip"] == "127.0.0.2", b
    [q] = events(server, "dsn_queued")
    assert q["original_queue_id"] == qid and q["recipient"] == SENDER, q
    [d] = events(server, "delivery")
    assert d["queue_id"] == q["queue_id"] and d["sender"] == "" and d["recipient"] == SENDER, d
    assert d["host"] == "mx.client.test" and d["ip"] == "127.0.0.4", d
    assert not events(server, "transient_failure"), diagnostics(server)


def test_null_mx_bounces_at_once_with_5_1_10(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.4"])
    dns = dnsmasq(mx={"client.test": [(10, "mx.client.test")]}, hosts={"mx.client.test": "127.0.0.4"},
                  null_mx=["nullmx.test"])
    sender_mx = peers.sink("127.0.0.4", port)
    server = sending_server(mailroom_factory, dns, port, ["nullmx.test"])

    started = time.monotonic()
    qid = send(server, ["someone@nullmx.test"], message("null mx", "someone@nullmx.test", "nowhere\r\n"))
    [b] = wait_for("the bounce", lambda: events(server, "bounce"), 10, server, dns)
    assert time.monotonic() - started < 5, "a null MX is a permanent failure: no retry first"
    assert b["queue_id"] == qid and b["recipient"] == "someone@nullmx.test", b
    assert "null MX" in b["response"], b
    assert b["host"] is None and b["ip"] is None, b
    assert not events(server, "transient_failure"), diagnostics(server)

    [dsn] = wait_for("the DSN at the sender domain's MX", sender_mx.messages, 15, server, dns)
    assert dsn["mail_args"].split(" ")[0] == "<>", dsn
    msg, parts = dsn_parts(dsn["message"])
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; someone@nullmx.test" in status, status
    assert "Status: 5.1.10" in status, status
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    [q] = events(server, "dsn_queued")
    assert q["original_queue_id"] == qid, q
    assert "query[MX] nullmx.test" in dns.log_text()


def test_an_undeliverable_dsn_is_not_bounced_again(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2", "127.0.0.5"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")], "refuse.test": [(10, "mx.refuse.test")]},
                  hosts={"mx1.dest.test": "127.0.0.2", "mx.refuse.test": "127.0.0.5"})
    peers.sink("127.0.0.2", port, "-f", "RCPT", "-B", "550 5.1.1 <nobody@dest.test>: User unknown")
    peers.sink("127.0.0.5", port, "-f", "RCPT", "-B", "550 5.7.1 <sender@refuse.test>: No bounces here")
    server = sending_server(mailroom_factory, dns, port, ["dest.test"])

    qid = send(server, ["nobody@dest.test"], message("double bounce", "nobody@dest.test", "x\r\n"),
               sender="sender@refuse.test")

    def both_bounced():
        bounces = events(server, "bounce")
        return bounces if len(bounces) >= 2 else None

    first, second = wait_for("the bounce of the message and of its DSN", both_bounced, 15, server, dns)
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    assert first["queue_id"] == qid and first["recipient"] == "nobody@dest.test", first
    [q] = events(server, "dsn_queued")
    assert q["original_queue_id"] == qid and q["recipient"] == "sender@refuse.test", q
    # The DSN (null sender) was refused with 5xx: logged as a bounce, and nothing more.
    assert second["queue_id"] == q["queue_id"] and second["sender"] == "", second
    assert second["recipient"] == "sender@refuse.test" and "No bounces here" in second["response"], second
    assert second["host"] == "mx.refuse.test" and second["ip"] == "127.0.0.5", second
    assert len(events(server, "dsn_queued")) == 1, diagnostics(server)
    assert len(events(server, "bounce")) == 2 and not events(server, "delivery"), diagnostics(server)


@pytest.mark.parametrize("goodbye", ["421 4.4.2 scripted Error: timeout exceeded", None], ids=["421", "close"])
def test_a_pooled_connection_closed_by_the_peer_does_not_defer_the_next_message(
        mailroom_factory, dnsmasq, peers, goodbye):
    port = mx_port(["127.0.0.2"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")]}, hosts={"mx1.dest.test": "127.0.0.2"})
    receiver = peers.scripted("127.0.0.2", port, ["250 2.1.5 Ok"])
    # A retry interval longer than the waits below: a deferral shows as a timeout here.
    server = sending_server(mailroom_factory, dns, port, ["dest.test"], retry={"schedule": ["30s"], "maxAge": "1h"})

    send(server, ["a@dest.test"], message("first", "a@dest.test", "one\r\n"))
    wait_for("the first message", lambda: receiver.messages, 10, server, dns)
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    # The worker keeps the connection for reuse (maxMessagesPerConnection, timeouts.idle 30s);
    # the peer closes it, as servers do with idle connections (Postfix's smtpd after
    # smtpd_timeout, with a 421 first).
    assert receiver.close_connections(goodbye) == 1
    qid = send(server, ["b@dest.test"], message("second", "b@dest.test", "two\r\n"))
    wait_for("the second message or its deferral",
             lambda: len(receiver.messages) == 2 or events(server, "transient_failure"), 10, server, dns)
    assert not events(server, "transient_failure"), diagnostics(server)
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    assert [d["queue_id"] for d in events(server, "delivery")][-1] == qid


def test_expiration_after_max_age_returns_the_message(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2", "127.0.0.4"])
    dns = dnsmasq(mx={"slow.test": [(10, "mx.slow.test")], "client.test": [(10, "mx.client.test")]},
                  hosts={"mx.slow.test": "127.0.0.2", "mx.client.test": "127.0.0.4"})
    receiver = peers.scripted("127.0.0.2", port, ["451 4.7.1 Greylisted, try again"])
    sender_mx = peers.sink("127.0.0.4", port)
    # Attempts at +0s and +2s; the next (+4s) is brought forward to the expiry (+3s).
    server = sending_server(mailroom_factory, dns, port, ["slow.test"], retry={"schedule": ["2s"], "maxAge": "3s"})
    started = time.monotonic()
    qid = send(server, ["late@slow.test"], message("expires", "late@slow.test", "too late\r\n"))

    [e] = wait_for("the expiration", lambda: events(server, "expiration"), 15, server, dns)
    elapsed = time.monotonic() - started
    assert 2.8 <= elapsed <= 3.9, f"expired after {elapsed:.2f}s (maxAge 3s, retries every 2s)"
    assert e["queue_id"] == qid and e["recipient"] == "late@slow.test", e
    assert "451" in e["response"] and "Greylisted" in e["response"], e
    failures = events(server, "transient_failure")
    assert [f["attempts"] for f in failures] == [1, 2] and len(receiver.rcpts) == 2, (failures, receiver.rcpts)
    # The second deferral's next attempt is the expiry, not +2s.
    last = int(datetime.fromisoformat(failures[-1]["ts"]).timestamp() * 1000)
    assert failures[-1]["next_attempt_ms"] - last < 1500, failures[-1]

    [dsn] = wait_for("the DSN", sender_mx.messages, 10, server, dns)
    assert dsn["mail_args"].split(" ")[0] == "<>", dsn
    msg, parts = dsn_parts(dsn["message"])
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; late@slow.test" in status and "Action: failed" in status, status
    assert "Status: 4.4.7" in status and "Greylisted" in status, status
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    [d] = events(server, "delivery")
    assert d["sender"] == "" and d["recipient"] == SENDER and d["ip"] == "127.0.0.4", d


def test_mixed_outcomes_in_one_transaction(mailroom_factory, dnsmasq, peers):
    port = mx_port(["127.0.0.2", "127.0.0.4"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")], "client.test": [(10, "mx.client.test")]},
                  hosts={"mx1.dest.test": "127.0.0.2", "mx.client.test": "127.0.0.4"})
    receiver = peers.scripted("127.0.0.2", port, ["250 2.1.5 Ok", "550 5.1.1 no such user", "451 4.2.0 busy",
                                                  "250 2.1.5 Ok"])
    sender_mx = peers.sink("127.0.0.4", port)
    server = sending_server(mailroom_factory, dns, port, ["dest.test"])
    qid = send(server, ["a@dest.test", "b@dest.test", "c@dest.test"], message("mixed", "a@dest.test", "m\r\n"))

    wait_for("two deliveries", lambda: len(receiver.messages) == 2, 15, server, dns)
    wait_for("an empty queue", lambda: queue_empty(server), 10, server, dns)
    first, second = receiver.messages
    assert first["rcpts"] == ["a@dest.test"] and second["rcpts"] == ["c@dest.test"], receiver.messages
    assert sorted(d["recipient"] for d in events(server, "delivery") if d["queue_id"] == qid) == \
        ["a@dest.test", "c@dest.test"]
    [b] = events(server, "bounce")
    assert b["recipient"] == "b@dest.test", b
    [t] = events(server, "transient_failure")
    assert t["recipient"] == "c@dest.test" and t["attempts"] == 1, t
    [dsn] = wait_for("the DSN", sender_mx.messages, 10, server, dns)
    status = dsn_parts(dsn["message"])[1][1].as_string()
    assert "b@dest.test" in status and "a@dest.test" not in status and "c@dest.test" not in status, status


def test_a_matching_reply_suspends_the_destination(mailroom_factory, dnsmasq, peers):
    """A rule whose pattern matches a reply suspends the destination for its duration: the
    retry due after 1 s waits for the suspension to end, and `queue stats` shows the rule."""
    port = mx_port(["127.0.0.2"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")]}, hosts={"mx1.dest.test": "127.0.0.2"})
    receiver = peers.scripted("127.0.0.2", port, ["421 4.7.0 Try again later, closing connection", "250 2.1.5 Ok"])
    rule = {"name": "back-off", "pattern": "(?i)try again later", "action": "suspend", "duration": "4s"}
    server = sending_server(mailroom_factory, dns, port, ["dest.test"], rules=[rule])
    qid = send(server, ["r@dest.test"], message("suspend", "r@dest.test", "x"))
    wait_for("the rule to be in force", lambda: events(server, "rule"), 10, server, dns)
    (fired,) = events(server, "rule")
    assert fired["rule"] == "back-off" and fired["action"] == "suspend", fired
    assert fired["destination"] == "domain:dest.test", fired
    stats = server.queue_stats()
    assert [r["rule"] for r in stats["rules"]] == ["back-off"], stats
    assert stats["rules"][0]["destination"] == "domain:dest.test"
    wait_for("delivery after the suspension", lambda: events(server, "delivery"), 15, server, dns)
    (failure,) = events(server, "transient_failure")
    assert failure["queue_id"] == qid
    # Two RCPTs: the 421 and the delivery; the retry due at +1 s waited for the rule (4 s).
    assert len(receiver.rcpts) == 2, receiver.rcpts
    gap = receiver.rcpts[1][0] - receiver.rcpts[0][0]
    assert gap >= 3.8, f"retried {gap:.2f}s after the 421, during the 4 s suspension"
    wait_for("the queue to empty", lambda: queue_empty(server), 10, server, dns)


def test_one_delay_warning_after_delay_warning_after(mailroom_factory, dnsmasq, peers):
    """With bounces.delayWarningAfter the sender gets exactly one `Action: delayed` report once
    the message has waited that long; retries go on."""
    port = mx_port(["127.0.0.2", "127.0.0.4"])
    dns = dnsmasq(mx={"dest.test": [(10, "mx1.dest.test")], "client.test": [(10, "mx.client.test")]},
                  hosts={"mx1.dest.test": "127.0.0.2", "mx.client.test": "127.0.0.4"})
    peers.scripted("127.0.0.2", port, ["451 4.3.0 Temporary local problem"])
    sender_mx = peers.sink("127.0.0.4", port)
    server = sending_server(mailroom_factory, dns, port, ["dest.test"], bounces={"delayWarningAfter": "2s"})
    qid = send(server, ["slow@dest.test"], message("slow", "slow@dest.test", "still trying\r\n"))
    [warning] = wait_for("the delay warning at the sender's MX", sender_mx.messages, 15, server, dns)
    assert warning["mail_args"].split(" ")[0] == "<>", warning
    msg, parts = dsn_parts(warning["message"])
    assert msg["Subject"].startswith("Delayed Mail"), msg["Subject"]
    status = parts[1].as_string()
    assert "Action: delayed" in status and "Final-Recipient: rfc822; slow@dest.test" in status, status
    assert "Will-Retry-Until:" in status, status
    # Retries go on, and no second warning comes.
    wait_for("two more attempts", lambda: len(events(server, "transient_failure")) >= 5, 15, server, dns)
    assert len(sender_mx.messages()) == 1, "exactly one delay warning"
    [q] = events(server, "dsn_queued")
    assert q["original_queue_id"] == qid and q["action"] == "delayed", q
    assert server.queue_stats()["messages"] == 1, "the original is still queued"
