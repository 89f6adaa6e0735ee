"""Traffic shaping across worker processes, end to end: one nats-server with JetStream, one
`mailroom inbound` process receiving mail into the cluster queue, and several `mailroom
outbound` processes delivering it, all started from ONE config file (queue.jetstream plus a
delivery policy). The shaping state (connection slots, GCRA arrival times) lives in the
JetStream KV buckets `<stream>_SLOTS` / `<stream>_RATES`, so the limits of a destination hold
for all the worker processes together, not per process.

The MX hosts are resolved through dnsmasq and are small threaded SMTP responders on
127.0.0.x (see `ShapingReceiver`) that record every connection (open and close times) and
every message (arrival time), and count the connections open at once.

Every process has its own stdout (the delivery log: `log.deliveryLog` is unset, so delivery
events go to stdout as JSON lines) and stderr files, the HTTP endpoint on an ephemeral port
(`127.0.0.1:0`), and is stopped by PID at teardown.
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
import urllib.request
from pathlib import Path

import pytest

from conftest import MAILROOM_BIN, default_plugins, free_port, parse_queued_id, to_yaml
from test_jetstream import Nats
from test_outbound import mx_port, wait_banner

SENDER = "sender@client.test"
HOSTNAME = "mail.example.test"


# ---------------------------------------------------------------------------------------------
# An SMTP receiver that measures connections


class ShapingReceiver:
    """A threaded SMTP server on ip:port that accepts everything (no PIPELINING, no STARTTLS)
    and records, per connection, when it was opened (accepted) and closed (221 sent or EOF),
    per message the arrival time (the final dot), and the most connections open at once.

    `stall_first=n`: the first n connections get no greeting until `release()` (a peer that
    hangs in the middle of a delivery). `quit_delay`: seconds before the 221 reply to QUIT
    (the connection counts as open until then)."""

    def __init__(self, ip: str, port: int, stall_first: int = 0, quit_delay: float = 0.0):
        self.ip, self.port = ip, port
        self.quit_delay = quit_delay
        self.lock = threading.Lock()
        self.open_now = 0
        self.peak = 0
        self.connections: list[dict] = []  # {"id", "open", "close", "peer", "messages"}
        self.messages: list[dict] = []  # {"t", "conn", "mail_from", "rcpts", "data", "subject"}
        self.stall_first = stall_first
        self.stalled = threading.Event()  # set when a stalled connection is waiting
        self._release = threading.Event()
        self.probing = True  # wait_banner's own probe connections are not counted
        self.socks: list[socket.socket] = []
        self._by_sock: dict[int, dict] = {}
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                conn = receiver._conn_of(self.request)
                try:
                    receiver.session(conn, self.rfile, self.wfile)
                except OSError:
                    pass
                finally:
                    receiver._closed(conn)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            request_queue_size = 256

            def process_request(self, request, client_address):
                # in the accepting thread, right after accept(): the open time is exact
                receiver._opened(request, client_address)
                super().process_request(request, client_address)

        self.server = Server((ip, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        stall, self.stall_first = self.stall_first, 0
        wait_banner(ip, port, self.thread.is_alive)
        deadline = time.monotonic() + 5
        while self.open_now and time.monotonic() < deadline:  # the probe's session is ending
            time.sleep(0.01)
        with self.lock:
            self.connections.clear()
            self.peak = self.open_now
            self.probing = False
            self.stall_first = stall

    # -- bookkeeping ----------------------------------------------------------------------------

    def _opened(self, sock, peer) -> dict:
        with self.lock:
            self.open_now += 1
            self.peak = max(self.peak, self.open_now)
            conn = {"id": len(self.connections), "open": time.monotonic(), "close": None, "peer": peer,
                    "messages": 0, "stall": False}
            if not self.probing and self.stall_first > 0:
                self.stall_first -= 1
                conn["stall"] = True
            self.connections.append(conn)
            self.socks.append(sock)
            self._by_sock[id(sock)] = conn
            return conn

    def _conn_of(self, sock) -> dict:
        with self.lock:
            return self._by_sock.pop(id(sock))

    def _closed(self, conn: dict):
        with self.lock:
            if conn["close"] is None:
                conn["close"] = time.monotonic()
                self.open_now -= 1

    def release(self):
        """Lets the stalled connections go on (greet) from now on."""
        self._release.set()

    def session(self, conn: dict, rfile, wfile):
        def reply(text: str):
            wfile.write(text.encode() + b"\r\n")
            wfile.flush()

        if conn["stall"]:
            self.stalled.set()
            self._release.wait(timeout=120)
        reply(f"220 {self.ip} ESMTP shaping receiver")
        mail_from, rcpts = None, []
        while True:
            line = rfile.readline(4096)
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                reply("250-receiver\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME")
            elif verb == "HELO":
                reply("250 receiver")
            elif verb == "MAIL":
                mail_from, rcpts = cmd[len("MAIL FROM:"):].split(" ", 1)[0], []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(cmd[len("RCPT TO:"):].split(" ", 1)[0].strip("<>"))
                reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    reply("554 5.5.1 Error: no valid recipients")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                data = []
                while True:
                    l = rfile.readline(1 << 20)
                    if not l:
                        return
                    if l == b".\r\n":
                        break
                    data.append(l[1:] if l.startswith(b".") else l)
                body = b"".join(data)
                subject = next((h.split(b":", 1)[1].strip().decode() for h in body.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                                if h.lower().startswith(b"subject:")), None)
                with self.lock:
                    self.messages.append({"t": time.monotonic(), "conn": conn["id"], "mail_from": mail_from,
                                          "rcpts": rcpts, "data": body, "subject": subject})
                    conn["messages"] += 1
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok: queued")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                if self.quit_delay:
                    time.sleep(self.quit_delay)
                reply("221 2.0.0 Bye")
                return
            else:
                reply("502 5.5.2 Error: command not recognized")

    # -- views ----------------------------------------------------------------------------------

    def arrivals(self) -> list[float]:
        with self.lock:
            return sorted(m["t"] for m in self.messages)

    def subjects(self) -> list[str]:
        with self.lock:
            return [m["subject"] for m in self.messages]

    def peak_from_intervals(self) -> int:
        """The most connections open at once, recomputed from the recorded intervals (a
        check of the live counter)."""
        with self.lock:
            points = []
            for c in self.connections:
                points.append((c["open"], 1))
                points.append((c["close"] if c["close"] is not None else float("inf"), -1))
        points.sort(key=lambda p: (p[0], p[1]))  # a close at the same instant goes first
        now = best = 0
        for _, d in points:
            now += d
            best = max(best, now)
        return best

    def summary(self) -> str:
        with self.lock:
            conns = [(c["id"], c["peer"][1], round(c["open"], 3),
                      None if c["close"] is None else round(c["close"], 3), c["messages"])
                     for c in self.connections]
            return (f"{self.ip}: peak {self.peak}, open now {self.open_now}, {len(self.messages)} messages, "
                    f"{len(conns)} connections (id, peer port, open, close, messages): {conns}")

    def stop(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Mailroom processes of a "cluster" sharing one config file


class MailroomProcess:
    """One `mailroom inbound|outbound --config F` process with its own stdout (the delivery
    log) and stderr files."""

    def __init__(self, name: str, args: list[str], workdir: Path):
        self.name = name
        self.args = args
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self):
        if not MAILROOM_BIN.exists():
            pytest.fail(f"mailroom binary not found at {MAILROOM_BIN} (build it with `cargo build -p mailroom` "
                        f"or set MAILROOM_BIN)")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        env.pop("MAILROOM_CONFIG", None)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen([str(MAILROOM_BIN), *self.args], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, cwd=self.stdout_path.parent, env=env, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self, event: str | None = None) -> list[dict]:
        """Delivery-log events on stdout (a line being written at the moment is skipped)."""
        try:
            text = self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and (event is None or e.get("event") == event):
                out.append(e)
        return out

    def diagnostics(self) -> str:
        state = "running" if self.alive() else f"exited {self.proc.returncode if self.proc else None}"
        events = self.events()
        shown = "\n".join(json.dumps(e) for e in events[-40:])
        return (f"\n--- {self.name} (pid {self.proc.pid if self.proc else None}, {state}) "
                f"delivery log: {len(events)} events, last ones ---\n{shown}"
                f"\n--- {self.name} stderr (tail) ---\n{self.stderr_text()[-3000:]}")

    def wait_ready(self, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited during startup{self.diagnostics()}")
            if "mailroom ready" in self.stderr_text():
                return self
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready within {timeout}s{self.diagnostics()}")

    def kill(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0):
        if not self.alive():
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


class Cluster:
    """nats-server, the config file shared by every process, and the processes."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "mailroom.yaml"
        self.nats = Nats(self.dir)
        self.smtp_port = free_port()
        self.procs: list[MailroomProcess] = []
        self.receivers: list[ShapingReceiver] = []

    def write_config(self, policy: dict, domains: list[str], **jetstream):
        cfg = {
            "hostname": HOSTNAME,
            "listeners": [{"name": "smtp", "address": f"127.0.0.1:{self.smtp_port}", "mode": "mx",
                           "acceptedDomains": domains, "plugins": default_plugins()}],
            "queue": {"jetstream": {"urls": [self.nats.url], "publishTimeout": "5s", **jetstream}},
            # every process on its own ephemeral port: several of them share this file
            "http": {"address": "127.0.0.1:0"},
            # no deliveryLog: each process writes its delivery events to its own stdout
            "log": {"level": "info", "format": "text"},
            "policies": [policy],
        }
        self.config_path.write_text(to_yaml(cfg))

    def process(self, name: str, *args: str) -> MailroomProcess:
        p = MailroomProcess(name, [*args, "--config", str(self.config_path)], self.dir)
        self.procs.append(p)
        return p

    def inbound(self) -> MailroomProcess:
        p = self.process("inbound", "inbound").start().wait_ready()
        wait_banner("127.0.0.1", self.smtp_port, p.alive)
        return p

    def outbound(self, name: str) -> MailroomProcess:
        return self.process(name, "outbound").start().wait_ready()

    def receiver(self, ip: str, port: int, **kw) -> ShapingReceiver:
        r = ShapingReceiver(ip, port, **kw)
        self.receivers.append(r)
        return r

    def queue_stats(self) -> dict:
        p = subprocess.run([str(MAILROOM_BIN), "queue", "--config", str(self.config_path), "stats"],
                           capture_output=True, timeout=30, cwd=self.dir)
        assert p.returncode == 0, f"mailroom queue stats exited {p.returncode}: {p.stderr.decode(errors='replace')}"
        return json.loads(p.stdout)

    def diagnostics(self) -> str:
        text = "".join(p.diagnostics() for p in self.procs)
        text += "".join(f"\n--- receiver ---\n{r.summary()[:4000]}" for r in self.receivers)
        return text

    def close(self):
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception:  # noqa: BLE001 - teardown goes on with the others
                p.kill()
        for r in self.receivers:
            r.stop()
        self.nats.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "cluster")
    c.nats.start()
    yield c
    c.close()


def wait_until(what: str, fn, timeout: float, cluster: Cluster, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{cluster.diagnostics()}")
        time.sleep(interval)


def policy(dns, port: int, **overrides) -> dict:
    p = {
        "name": "default",
        "resolver": {"nameservers": [dns.nameserver]},
        "mxPort": port,
        "allowPrivateDestinations": True,
        "tls": "disabled",
        "retry": {"schedule": ["1s"], "maxAge": "1h"},
        "timeouts": {"connect": "5s", "greeting": "10s", "command": "10s", "dataStart": "10s",
                     "dataBlock": "10s", "dataEnd": "10s"},
    }
    p.update(overrides)
    return p


def message(subject: str, to: str) -> bytes:
    return (f"From: Sender <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@client.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
            f"\r\nbody of {subject}\r\n").encode()


def send_all(port: int, mails: list[tuple[str, str]]) -> dict[str, str]:
    """Sends each (subject, recipient) as its own transaction over one session: {subject: queue id}."""
    ids = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        for subject, rcpt in mails:
            code, resp = s.mail(SENDER)
            assert code == 250, resp
            code, resp = s.rcpt(rcpt)
            assert code == 250, (rcpt, resp)
            code, resp = s.data(message(subject, rcpt))
            assert code == 250, (subject, code, resp)
            ids[subject] = parse_queued_id(resp.decode())
    return ids


def max_in_window(times: list[float], width: float) -> int:
    """The most of `times` in any half-open window [t, t + width)."""
    times = sorted(times)
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= width:
            j += 1
        best = max(best, i - j + 1)
    return best


def jetstream_streams(nats: Nats) -> dict[str, dict]:
    """{stream name: state} from the monitoring endpoint (KV bucket B is the stream KV_B)."""
    url = f"http://127.0.0.1:{nats.mon}/jsz?accounts=true&streams=true"
    with urllib.request.urlopen(url, timeout=5) as r:
        jsz = json.loads(r.read())
    out = {}
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            out[stream["name"]] = stream.get("state") or {}
    return out


# ---------------------------------------------------------------------------------------------
# Tests

SHAPED_N = 100  # at 600/min (one per 100 ms, burst 10): at least (100 - 10) * 100 ms = 9 s
FREE_N = 30
RATE_COUNT, RATE_PER_S = 600, 60.0
INTERVAL = RATE_PER_S / RATE_COUNT  # 0.1 s
BURST = max(1, RATE_COUNT // 60)  # 10 (shaping.rs: burst = max(1, count / 60))
MAX_CONNECTIONS = 2


def test_three_worker_processes_share_the_limits(cluster, dnsmasq):
    started = time.monotonic()
    port = mx_port(["127.0.0.2", "127.0.0.3"])
    dns = dnsmasq(mx={"shaped.test": [(10, "mx.shaped.test")], "free.test": [(10, "mx.free.test")]},
                  hosts={"mx.shaped.test": "127.0.0.2", "mx.free.test": "127.0.0.3"})
    shaped = cluster.receiver("127.0.0.2", port)
    free = cluster.receiver("127.0.0.3", port)
    cluster.write_config(
        policy(dns, port,
               destinations=[{"name": "shaped", "domains": ["shaped.test"], "maxConnections": MAX_CONNECTIONS,
                              "rate": f"{RATE_COUNT}/min"}],
               defaultLimits={},  # free.test: no limits at all
               concurrency=16, maxMessagesPerConnection=5),
        ["shaped.test", "free.test"])
    inbound = cluster.inbound()
    workers = [cluster.outbound(f"outbound{i}") for i in range(3)]

    # Interleaved: three shaped.test messages, then one free.test message, ...
    mails, s, f = [], 0, 0
    while s < SHAPED_N or f < FREE_N:
        for _ in range(3):
            if s < SHAPED_N:
                mails.append((f"shaped-{s:03d}", f"rcpt{s}@shaped.test"))
                s += 1
        if f < FREE_N:
            mails.append((f"free-{f:03d}", f"rcpt{f}@free.test"))
            f += 1
    send_started = time.monotonic()
    ids = send_all(cluster.smtp_port, mails)
    sent = time.monotonic()
    assert len(ids) == SHAPED_N + FREE_N

    wait_until(f"all {FREE_N} free.test messages", lambda: len(free.messages) >= FREE_N, 10, cluster)
    free_done = time.monotonic()
    wait_until(f"all {SHAPED_N} shaped.test messages", lambda: len(shaped.messages) >= SHAPED_N, 40, cluster)
    shaped_done = time.monotonic()
    wait_until("an empty queue", lambda: cluster.queue_stats()["messages"] == 0, 15, cluster, interval=0.3)
    time.sleep(0.5)  # anything delivered twice would show up by now
    diag = cluster.diagnostics
    with shaped.lock, free.lock:
        shaped_msgs, free_msgs = list(shaped.messages), list(free.messages)

    # Every message arrived exactly once, at its destination.
    assert sorted(m["subject"] for m in shaped_msgs) == [f"shaped-{i:03d}" for i in range(SHAPED_N)], diag()
    assert sorted(m["subject"] for m in free_msgs) == [f"free-{i:03d}" for i in range(FREE_N)], diag()

    # maxConnections: never more than 2 connections open at once at shaped.test's MX, over
    # the three processes together.
    assert shaped.peak <= MAX_CONNECTIONS, f"{shaped.peak} connections at once (max {MAX_CONNECTIONS}){diag()}"
    assert shaped.peak_from_intervals() <= MAX_CONNECTIONS, diag()
    # maxMessagesPerConnection 5: at least 20 connections, none carrying more than 5.
    per_conn = [c["messages"] for c in shaped.connections]
    assert max(per_conn) <= 5, per_conn
    assert len([n for n in per_conn if n]) >= SHAPED_N // 5, per_conn

    # rate 600/min: one message per 100 ms after a burst of 10. GCRA lets n + 1 units pass
    # no faster than (n - (burst - 1)) * 100 ms apart, so at most 19 rate checks pass within
    # any 1 s; allowing one more for the latency between the rate check and the arrival,
    # at most 10 + 10 arrive in any 1 s window, and the 100 take at least (100 - 10) * 100 ms.
    arrivals = [m["t"] for m in shaped_msgs]
    span = max(arrivals) - min(arrivals)
    per_second = max_in_window(arrivals, 1.0)
    window_bound = BURST + int(1.0 / INTERVAL)
    assert per_second <= window_bound, f"{per_second} arrivals within 1 s (at most {window_bound}){diag()}"
    min_span = (SHAPED_N - BURST) * INTERVAL
    assert span >= min_span - 0.3, f"{SHAPED_N} messages in {span:.2f}s (at least {min_span:.1f}s at {RATE_COUNT}/min)"

    # free.test is not held back by shaped.test's limits: all of it arrives within a few
    # seconds of being sent, long before shaped.test is done.
    free_last = max(m["t"] for m in free_msgs)
    assert free_last - sent < 5.0, f"free.test's last message {free_last - sent:.2f}s after sending ended{diag()}"
    assert free_last < max(arrivals) - 3.0, (f"free.test done at +{free_last - send_started:.2f}s, shaped.test at "
                                             f"+{max(arrivals) - send_started:.2f}s")

    # The work was spread over the processes, and each one's log agrees with the receivers.
    delivered = {w.name: w.events("delivery") for w in workers}
    counts = {name: {"shaped": sum(e["domain"] == "shaped.test" for e in ev),
                     "free": sum(e["domain"] == "free.test" for e in ev)} for name, ev in delivered.items()}
    assert sum(c["shaped"] for c in counts.values()) == SHAPED_N, (counts, diag())
    assert sum(c["free"] for c in counts.values()) == FREE_N, (counts, diag())
    assert sum(1 for c in counts.values() if c["shaped"] + c["free"] > 0) >= 2, (counts, diag())
    all_ids = sorted(e["queue_id"] for ev in delivered.values() for e in ev)
    assert all_ids == sorted(ids.values()), "each queue id delivered once"
    for w in workers:
        assert not w.events("transient_failure") and not w.events("bounce"), w.diagnostics()
        assert w.alive(), w.diagnostics()
    assert inbound.alive(), inbound.diagnostics()

    # The shared state lives in JetStream KV.
    streams = jetstream_streams(cluster.nats)
    assert {"KV_MAILROOM_SLOTS", "KV_MAILROOM_RATES"} <= set(streams), streams
    # Every passed rate check is one write to the rates bucket (the only rate here is
    # shaped.test's message rate): more writes than messages means units taken for nothing.
    rate_units = streams["KV_MAILROOM_RATES"].get("last_seq", 0)
    slot_writes = streams["KV_MAILROOM_SLOTS"].get("last_seq", 0)

    print(f"\nshaping: peak connections {shaped.peak} at shaped.test ({len(shaped.connections)} connections, "
          f"{free.peak} at free.test); shaped.test {SHAPED_N} in {span:.2f}s (min {min_span:.1f}s), "
          f"max {per_second}/1s; free.test done {free_done - send_started:.2f}s after the first send "
          f"(sending took {sent - send_started:.2f}s), shaped.test {shaped_done - send_started:.2f}s; "
          f"rate units taken {rate_units} for {SHAPED_N} messages; slot writes {slot_writes}; "
          f"per process {counts}; test {time.monotonic() - started:.1f}s")


def test_killing_a_worker_process_mid_delivery_loses_nothing(cluster, dnsmasq):
    port = mx_port(["127.0.0.2"])
    dns = dnsmasq(mx={"shaped.test": [(10, "mx.shaped.test")]}, hosts={"mx.shaped.test": "127.0.0.2"})
    receiver = cluster.receiver("127.0.0.2", port, stall_first=1)
    lease_time = 2.0
    cluster.write_config(
        policy(dns, port,
               destinations=[{"name": "shaped", "domains": ["shaped.test"], "maxConnections": 2}],
               # the stalled greeting must outlast the lease time many times over
               timeouts={"connect": "5s", "greeting": "60s", "command": "10s", "dataStart": "10s",
                         "dataBlock": "10s", "dataEnd": "10s"}),
        ["shaped.test"], leaseTime="2s")
    cluster.inbound()
    a = cluster.outbound("outboundA")

    [qid] = send_all(cluster.smtp_port, [("stalled", "rcpt@shaped.test")]).values()
    wait_until("worker A's connection to the MX", receiver.stalled.is_set, 15, cluster)
    # A stays in the middle of the delivery for longer than the lease time: it extends its lease,
    # so the entry is not handed out again meanwhile (no second connection).
    time.sleep(lease_time * 1.5)
    assert len(receiver.connections) == 1 and not receiver.messages, receiver.summary()
    stats = cluster.queue_stats()
    assert stats["messages"] == 1 and stats["backlog"]["default"]["leased"] == 1, (stats, cluster.diagnostics())

    a.kill()  # SIGKILL in the middle of the delivery
    killed = time.monotonic()
    receiver.release()  # from now on the receiver answers (A's connection is gone with A)
    b = cluster.outbound("outboundB")

    wait_until("the delivery by worker B", lambda: receiver.messages, 20, cluster)
    redelivered_after = receiver.messages[0]["t"] - killed
    wait_until("an empty queue", lambda: cluster.queue_stats()["messages"] == 0, 15, cluster, interval=0.3)
    time.sleep(lease_time + 0.5)  # a second copy would come within a lease time
    [m] = receiver.messages
    assert m["subject"] == "stalled" and m["rcpts"] == ["rcpt@shaped.test"], m
    assert not a.events("delivery"), a.diagnostics()
    [d] = b.events("delivery")
    assert d["queue_id"] == qid and d["recipient"] == "rcpt@shaped.test", d
    assert d["deliveries"] >= 2, f"the queue handed the entry out again: {d}"
    stats = cluster.queue_stats()
    assert stats["messages"] == 0, stats
    zero = {"ready": 0, "deferred": 0, "leased": 0}
    assert stats["backlog"].get("default", zero) == zero, stats
    assert not b.events("transient_failure"), b.diagnostics()
    print(f"\nkill: delivered by B {redelivered_after:.2f}s after A was killed (lease time {lease_time}s); "
          f"connections {len(receiver.connections)}, deliveries field {d['deliveries']}")


def test_a_connection_holds_its_slot_until_it_is_closed(cluster, dnsmasq):
    port = mx_port(["127.0.0.2"])
    dns = dnsmasq(mx={"shaped.test": [(10, "mx.shaped.test")]}, hosts={"mx.shaped.test": "127.0.0.2"})
    receiver = cluster.receiver("127.0.0.2", port, quit_delay=1.0)  # answers QUIT after 1 s
    cluster.write_config(
        policy(dns, port, destinations=[{"name": "shaped", "domains": ["shaped.test"], "maxConnections": 1}],
               defaultLimits={}, concurrency=8, maxMessagesPerConnection=2),
        ["shaped.test"])
    cluster.inbound()
    for i in range(3):
        cluster.outbound(f"outbound{i}")
    send_all(cluster.smtp_port, [(f"m-{i:02d}", f"rcpt{i}@shaped.test") for i in range(12)])
    wait_until("all 12 messages", lambda: len(receiver.messages) >= 12, 40, cluster)
    assert receiver.peak_from_intervals() <= 1, f"maxConnections 1: {receiver.summary()}"
