"""Fixtures for the Mailroom end-to-end tests.

Every test talks to a real `mailroom serve` process started from the binary named by the
environment variable MAILROOM_BIN (default: <repo>/target/debug/mailroom). The tests never
build the binary themselves.

A server gets its own temporary directory holding the config, the spool, the delivery log and
its stderr/stdout, listens on free loopback ports only (127.0.0.1), and is stopped by PID on
teardown (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

import json
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAILROOM_BIN = Path(os.environ.get("MAILROOM_BIN", REPO / "target" / "debug" / "mailroom"))

HOSTNAME = "mail.example.test"
LOCAL_DOMAIN = "example.test"

# Users of the AUTH users file (bcrypt hashes are generated per session).
USERS = {"alice": "correct horse battery staple", "bob": "hunter2-Hunter2"}

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
IO_TIMEOUT = 15.0

QUEUED_RE = re.compile(r"^Ok: queued as ([0-9A-HJKMNP-TV-Z]{26})$")


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_scalar(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return str(v)
    # JSON strings are valid YAML double-quoted scalars.
    return json.dumps(str(v))


def to_yaml(value, indent: int = 0) -> str:
    """A tiny block-style YAML emitter for dicts/lists/scalars (enough for our configs)."""
    pad = "  " * indent
    out = []
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:\n{to_yaml(v, indent + 1)}")
            elif isinstance(v, dict):
                out.append(f"{pad}{k}: {{}}\n")
            elif isinstance(v, list):
                out.append(f"{pad}{k}: []\n")
            else:
                out.append(f"{pad}{k}: {_yaml_scalar(v)}\n")
        return "".join(out)
    if isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                body = to_yaml(item, indent + 1)
                # put the first line right after "- "
                first, _, rest = body.partition("\n")
                out.append(f"{pad}- {first.strip()}\n{rest}")
            elif isinstance(item, dict):
                out.append(f"{pad}- {{}}\n")
            elif isinstance(item, list):
                out.append(f"{pad}- []\n")
            else:
                out.append(f"{pad}- {_yaml_scalar(item)}\n")
        return "".join(out)
    return pad + _yaml_scalar(value) + "\n"


def default_plugins() -> list:
    return [{"headers": {"addMessageId": True, "addDate": True}}]


def parse_queued_id(text: str) -> str:
    """The queue id of a `250 2.0.0 Ok: queued as <ULID>` reply text (without code)."""
    t = text.strip()
    if t.startswith("2.0.0 "):
        t = t[len("2.0.0 "):]
    m = QUEUED_RE.match(t)
    assert m, f"not a 'queued as' reply: {text!r}"
    return m.group(1)


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """Splits a stored message into our leading Received: field and the rest."""
    assert stored.startswith(b"Received: "), f"stored message does not start with Received: {stored[:200]!r}"
    pos = stored.index(b"\r\n") + 2
    while stored[pos:pos + 1] in (b"\t", b" "):
        pos = stored.index(b"\r\n", pos) + 2
    return stored[:pos], stored[pos:]


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs of the header section at the start of `block`."""
    head = block.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in ("\t", " ") and fields:
            n, v = fields[-1]
            fields[-1] = (n, v + " " + line.strip())
        elif ":" in line:
            n, v = line.split(":", 1)
            fields.append((n.strip(), v.strip()))
    return fields


def read_spool_file(path: Path) -> tuple[dict, bytes]:
    """Reads `<spool>/queue/<ULID>.msg` (format documented in mailroom-queue/src/local/format.rs):
    magic "MRQ1", u32 envelope length, u64 body length, u32 crc, envelope JSON, body, u32 crc."""
    data = path.read_bytes()
    assert data[:4] == b"MRQ1", f"{path}: unexpected magic {data[:4]!r}"
    env_len = int.from_bytes(data[4:8], "little")
    body_len = int.from_bytes(data[8:16], "little")
    env = json.loads(data[20:20 + env_len])
    body = data[20 + env_len:20 + env_len + body_len]
    assert len(data) == 24 + env_len + body_len
    return env, body


# ---------------------------------------------------------------------------------------------
# A raw SMTP client (for BDAT, pipelining, timeouts and shutdown tests)


class RawSMTP:
    """A line-oriented SMTP client over a plain socket with bounded waits."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = IO_TIMEOUT, sock=None):
        self.sock = sock or socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data: bytes | str):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unparsed bytes {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[str]]:
        """Reads one (possibly multi-line) reply: (code, [texts without code])."""
        lines = []
        while True:
            line = self._read_line().decode("utf-8", "replace")
            assert len(line) >= 3 and line[:3].isdigit(), f"malformed reply line {line!r}"
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return int(line[:3]), lines
            assert line[3] == "-", f"malformed reply line {line!r}"

    def read_until_eof(self, timeout: float = IO_TIMEOUT) -> bytes:
        """Everything until the server closes (asserts it does within timeout)."""
        self.sock.settimeout(timeout)
        data = self.buf
        self.buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        else:
            raise AssertionError(f"server did not close the connection within {timeout}s; got {data!r}")
        return data

    def is_closed(self, timeout: float = 3.0) -> bool:
        """True if the server closed the connection (EOF/reset) within timeout and sent nothing."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return chunk == b""

    def banner(self) -> tuple[int, list[str]]:
        return self.reply()

    def ehlo(self, name: str = "client.example.org") -> tuple[int, list[str]]:
        code, lines = self.cmd(f"EHLO {name}")
        assert code == 250, (code, lines)
        return code, lines


# ---------------------------------------------------------------------------------------------
# The server under test


class MailroomServer:
    """One `mailroom serve` process with its own config, spool, logs and ports."""

    def __init__(self, workdir: Path, listeners: list[dict], tls_files: dict | None, users_file: Path | None,
                 extra: dict | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "mailroom.yaml"
        self.spool = self.dir / "spool"
        self.delivery_log = self.dir / "delivery.jsonl"
        self.stderr_path = self.dir / "stderr.log"
        self.stdout_path = self.dir / "stdout.log"
        self.listener_templates = listeners
        self.tls_files = tls_files
        self.users_file = users_file
        self.extra = extra or {}
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.http_port = 0
        self.starts = 0
        self._pick_ports()

    # -- config ---------------------------------------------------------------------------------

    def _pick_ports(self):
        used = set()

        def pick():
            while True:
                p = free_port()
                if p not in used:
                    used.add(p)
                    return p

        self.ports = {l["name"]: pick() for l in self.listener_templates}
        self.http_port = pick()

    def config(self) -> dict:
        listeners = []
        for tmpl in self.listener_templates:
            l = dict(tmpl)
            l["address"] = f"127.0.0.1:{self.ports[l['name']]}"
            l.setdefault("mode", "mx")
            l.setdefault("acceptedDomains", [LOCAL_DOMAIN])
            l.setdefault("plugins", default_plugins())
            tls = l.pop("tls", None)
            if isinstance(tls, dict):
                l["tls"] = tls  # explicit TlsSpec
            elif tls:
                assert self.tls_files, "tls requested but no certificate generated"
                l["tls"] = {"certFile": str(self.tls_files["cert"]), "keyFile": str(self.tls_files["key"]),
                            "implicit": tls == "implicit"}
            if l.pop("auth", None):
                assert self.users_file
                l["auth"] = {"usersFile": str(self.users_file), "mechanisms": ["PLAIN", "LOGIN"]}
            listeners.append(l)
        cfg = {
            "hostname": HOSTNAME,
            "listeners": listeners,
            "queue": {"local": {"path": str(self.spool)}},
            "http": {"address": f"127.0.0.1:{self.http_port}"},
            "log": {"level": "info", "format": "text", "deliveryLog": str(self.delivery_log)},
            # Reception tests look at the queue: mail stays there unless a test delivers it
            # (tests of delivery give their own `policies`).
            "policies": [{"name": "default", "hold": True}],
        }
        cfg.update(self.extra)
        return cfg

    def write_config(self):
        self.config_path.write_text(to_yaml(self.config()))

    # -- process --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def port(self, name: str = "smtp") -> int:
        return self.ports[name]

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _failure(self, why: str) -> str:
        return (f"mailroom serve {why}\n--- config {self.config_path} ---\n"
                f"{self.config_path.read_text() if self.config_path.exists() else ''}"
                f"--- stderr (tail) ---\n{self.stderr_text()[-6000:]}")

    def start(self, timeout: float = STARTUP_TIMEOUT):
        """Starts the server and waits until /readyz is 200 and every listener greets."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not MAILROOM_BIN.exists():
            pytest.fail(f"mailroom binary not found at {MAILROOM_BIN} (build it with `cargo build -p mailroom` "
                        f"or set MAILROOM_BIN)")
        for attempt in range(3):
            self.write_config()
            with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
                err.write(f"\n===== start #{self.starts} (attempt {attempt}) =====\n".encode())
                err.flush()
                env = dict(os.environ)
                env.pop("RUST_LOG", None)
                env.pop("MAILROOM_CONFIG", None)
                self.proc = subprocess.Popen(
                    [str(MAILROOM_BIN), "serve", "--config", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.dir, env=env,
                    start_new_session=True,
                )
            self.starts += 1
            ok, why = self._wait_ready(timeout)
            if ok:
                return self
            text = self.stderr_text()
            if self.proc.poll() is not None and "in use" in text.split("=====")[-1].lower():
                # a port we picked was taken meanwhile: pick others and retry
                self._pick_ports()
                continue
            self.kill()
            pytest.fail(self._failure(why))
        pytest.fail(self._failure("could not bind its ports after 3 attempts"))

    def _wait_ready(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        why = "did not become ready"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                return False, f"exited with status {rc} during startup"
            try:
                status, _ = self.http_get("/readyz", timeout=1.0)
                if status == 200:
                    break
                why = f"/readyz answered {status}"
            except OSError as e:
                why = f"/readyz not reachable: {e}"
            time.sleep(0.05)
        else:
            return False, f"{why} within {timeout}s"
        for name, port in self.ports.items():
            tmpl = next(l for l in self.listener_templates if l["name"] == name)
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=max(1.0, deadline - time.monotonic()))
                if tmpl.get("tls") == "implicit" or (isinstance(tmpl.get("tls"), dict) and tmpl["tls"].get("implicit")):
                    # greets only after the TLS handshake (any certificate will do here)
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    sock = ctx.wrap_socket(sock, server_hostname=HOSTNAME)
                if tmpl.get("proxyProtocol"):
                    sock.sendall(b"PROXY UNKNOWN\r\n")
                with RawSMTP(port, sock=sock, timeout=max(1.0, deadline - time.monotonic())) as c:
                    code, lines = c.banner()
                    if code != 220:
                        return False, f"listener {name} greeted with {code} {lines}"
                    c.cmd("QUIT")
            except (OSError, EOFError) as e:
                return False, f"listener {name} on port {port}: no banner: {e}"
        return True, ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int):
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self):
        """SIGKILL, by PID, and reap."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait; SIGKILL after timeout. Returns the exit status (None if killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def restart(self):
        self.stop()
        return self.start()

    # -- HTTP -----------------------------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of metric `name` in /metrics whose label sets include `labels`
        (all of them when none are given)."""
        status, text = self.http_get("/metrics")
        assert status == 200, (status, text[:500])
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m and m.group(1) == name:
                found = True
                if all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
                    total += float(m.group(3))
        assert found, f"metric {name} not in /metrics:\n{text[:3000]}"
        return total

    # -- queue CLI ------------------------------------------------------------------------------

    def queue_cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        p = subprocess.run([str(MAILROOM_BIN), "queue", "--config", str(self.config_path), *args],
                           capture_output=True, timeout=timeout, cwd=self.dir)
        if check:
            assert p.returncode == 0, (f"mailroom queue {' '.join(args)} exited {p.returncode}:\n"
                                       f"{p.stderr.decode(errors='replace')}")
        return p

    def queue_stats(self) -> dict:
        return json.loads(self.queue_cli("stats").stdout)

    def queue_list(self, limit: int = 100000) -> list[dict]:
        out = self.queue_cli("list", "--limit", str(limit)).stdout.decode()
        return [json.loads(l) for l in out.splitlines() if l.strip()]

    def queue_show(self, qid: str) -> tuple[dict, bytes]:
        """(envelope JSON, stored message bytes) of `mailroom queue show ID`."""
        head, body = self.queue_show_full(qid)
        return head["envelope"], body

    def queue_show_full(self, qid: str) -> tuple[dict, bytes]:
        """({"envelope", "entries"} JSON, stored message bytes) of `mailroom queue show ID`."""
        out = self.queue_cli("show", qid).stdout
        head, sep, body = out.partition(b"\n\n")
        assert sep, f"unexpected `queue show` output: {out[:500]!r}"
        return json.loads(head), body

    def spool_file(self, qid: str) -> tuple[dict, bytes]:
        return read_spool_file(self.spool / "queue" / f"{qid}.msg")

    def delivery_log_lines(self) -> list[dict]:
        if not self.delivery_log.exists():
            return []
        out = []
        for line in self.delivery_log.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out


class ServerFactory:
    def __init__(self, base: Path, tls_files: dict, users_file: Path):
        self.base = base
        self.tls_files = tls_files
        self.users_file = users_file
        self.servers: list[MailroomServer] = []

    def make(self, listeners: list[dict] | None = None, start: bool = True, extra: dict | None = None,
             **listener_opts) -> MailroomServer:
        """A server with `listeners` (dicts of ListenerSpec keys; `address` is filled in,
        `tls: True|"implicit"` and `auth: True` are expanded), or one listener named "smtp"
        built from `listener_opts`."""
        if listeners is None:
            listeners = [dict({"name": "smtp"}, **listener_opts)]
        d = self.base / f"server{len(self.servers)}"
        s = MailroomServer(d, listeners, self.tls_files, self.users_file, extra)
        self.servers.append(s)
        if start:
            s.start()
        return s

    def close_all(self):
        for s in self.servers:
            s.stop()


# ---------------------------------------------------------------------------------------------
# Session-wide material: TLS certificate and users file


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "tls.crt", d / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={HOSTNAME}",
         "-addext", f"subjectAltName=DNS:{HOSTNAME},DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return {"cert": cert, "key": key}


@pytest.fixture(scope="session")
def users_file(tmp_path_factory) -> Path:
    import bcrypt

    d = tmp_path_factory.mktemp("users")
    p = d / "users"
    lines = []
    for name, pw in USERS.items():
        h = bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines.append(f"{name}:{h}")
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture(scope="session")
def ssl_context(tls_files) -> ssl.SSLContext:
    """A client context that trusts (only) the generated self-signed certificate."""
    ctx = ssl.create_default_context(cafile=str(tls_files["cert"]))
    return ctx


@pytest.fixture
def mailroom_factory(tmp_path, tls_files, users_file):
    f = ServerFactory(tmp_path, tls_files, users_file)
    yield f
    f.close_all()


@pytest.fixture(scope="module")
def module_factory(tmp_path_factory, tls_files, users_file):
    f = ServerFactory(tmp_path_factory.mktemp("mod"), tls_files, users_file)
    yield f
    f.close_all()


@pytest.fixture
def mailroom(mailroom_factory) -> MailroomServer:
    """A running server with one mx listener "smtp" for example.test (defaults otherwise)."""
    return mailroom_factory.make()


# ---------------------------------------------------------------------------------------------
# A real DNS server on loopback (dnsmasq) for the outbound delivery tests


def dns_query(port: int, name: str, qtype: int, host: str = "127.0.0.1", timeout: float = 1.0) -> tuple[int, int]:
    """One DNS question over UDP: (RCODE, number of answer records). qtype: 1 A, 12 PTR, 15 MX,
    16 TXT, 28 AAAA."""
    import random
    import struct

    tid = random.randint(0, 0xFFFF)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", tid, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (host, port))
        while True:
            data, _ = s.recvfrom(65535)
            rid, flags, _qd, an = struct.unpack(">HHHH", data[:8])
            if rid == tid:
                return flags & 0xF, an


class Dnsmasq:
    """A dnsmasq process answering, on 127.0.0.1:<free port>, only for the records it is given
    (no upstream, no /etc/hosts; names under `local` domains that it does not know are NXDOMAIN).

    mx: {domain: [(preference, host), ...]}; hosts: {name: "ip" or ["ip", ...]} (A/AAAA);
    null_mx: [domain, ...] (RFC 7505 `MX 0 .`, written as a raw record since --mx-host cannot);
    txt: {name: "text" or ["text", ...]} (one TXT record per text; texts over 255 bytes are split
    into strings of 255, which readers join); ptr: {"ip": "host"} (reverse names are derived,
    and answered only from these records)."""

    def __init__(self, workdir: Path, mx: dict | None = None, hosts: dict | None = None,
                 null_mx: list | None = None, local: tuple = ("test",), txt: dict | None = None,
                 ptr: dict | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "dnsmasq.log"
        self.stderr_path = self.dir / "dnsmasq.stderr"
        self.mx = mx or {}
        self.hosts = hosts or {}
        self.null_mx = null_mx or []
        self.txt = txt or {}
        self.ptr = ptr or {}
        self.local = tuple(local) + (("in-addr.arpa", "ip6.arpa") if self.ptr else ())
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str:
        found = shutil.which("dnsmasq") or next(
            (p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.access(p, os.X_OK)), None)
        if not found:
            pytest.fail("dnsmasq not installed (Debian package dnsmasq-base): run scripts/test-deps.sh")
        return found

    @property
    def nameserver(self) -> str:
        """The `resolver.nameservers` entry of a delivery policy."""
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        a = [self.binary(), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-poll",
             "--no-hosts", f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
             "--pid-file=", f"--log-facility={self.log}", "--log-queries"]
        if os.geteuid() == 0:
            a.append("--user=root")  # otherwise it drops to `nobody`, who cannot write the log
        a += [f"--local=/{d}/" for d in self.local]
        for domain, records in self.mx.items():
            a += [f"--mx-host={domain},{host},{pref}" for pref, host in records]
        for name, addrs in self.hosts.items():
            for ip in [addrs] if isinstance(addrs, str) else addrs:
                a.append(f"--host-record={name},{ip}")
        # MX RDATA: preference 0 (00 00), exchange the root name (00).
        a += [f"--dns-rr={domain},15,000000" for domain in self.null_mx]
        for name, texts in self.txt.items():
            for text in [texts] if isinstance(texts, str) else texts:
                # Raw RDATA (type 16): --txt-record would keep quotes and split at commas.
                data = text.encode()
                parts = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
                rdata = b"".join(bytes([len(p)]) + p for p in parts)
                a.append(f"--dns-rr={name},16,{rdata.hex()}")
        for ip, host in self.ptr.items():
            a.append(f"--ptr-record={ipaddress.ip_address(ip).reverse_pointer},{host}")
        return a

    def start(self, timeout: float = 10.0):
        for _ in range(3):
            self.port = free_port()
            with open(self.stderr_path, "ab") as err:
                self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                             cwd=self.dir, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    dns_query(self.port, "ready.invalid", 1, timeout=0.2)
                    break
                except OSError:  # timeout or ICMP port unreachable: not listening yet
                    time.sleep(0.05)
            if self.proc.poll() is None and time.monotonic() < deadline:
                self._check_records()
                return self
            out = self.stderr_path.read_text(errors="replace")
            self.stop()
            if "in use" not in out.lower():
                pytest.fail(f"dnsmasq did not start: {' '.join(self.args())}\n{out[-3000:]}")
        pytest.fail("dnsmasq: no free port after 3 attempts")

    def _check_records(self):
        """The server answers what it was given (a typo in a flag must not look like a worker bug)."""
        for domain, records in self.mx.items():
            assert dns_query(self.port, domain, 15) == (0, len(records)), f"dnsmasq MX {domain}"
        for domain in self.null_mx:
            assert dns_query(self.port, domain, 15) == (0, 1), f"dnsmasq null MX {domain}"
        for name in self.hosts:
            rcode, an = dns_query(self.port, name, 1)
            assert rcode == 0, f"dnsmasq A {name}: rcode {rcode}"
        for name, texts in self.txt.items():
            texts = [texts] if isinstance(texts, str) else texts
            rcode, an = dns_query(self.port, name, 16)
            # A long answer comes back truncated over UDP (readers retry over TCP): rcode only.
            long = sum(len(t) for t in texts) > 400
            assert rcode == 0 and (long or an == len(texts)), f"dnsmasq TXT {name}: {rcode} {an}"
        for ip in self.ptr:
            name = ipaddress.ip_address(ip).reverse_pointer
            assert dns_query(self.port, name, 12) == (0, 1), f"dnsmasq PTR {name}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None


@pytest.fixture
def dnsmasq(tmp_path):
    """Starts DNS servers: `dnsmasq(mx={...}, hosts={...}, null_mx=[...])` returns a running
    Dnsmasq (see there); all are stopped by PID at teardown."""
    started: list[Dnsmasq] = []

    def start(**zone) -> Dnsmasq:
        d = Dnsmasq(tmp_path / f"dns{len(started)}", **zone)
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()
