"""The session plugins through the real `mailroom serve`: `earlyTalker` (a client that talks
before the greeting is refused, a patient one greeted after the delay), `tarpit` (replies to
listed networks are held back, others are not), `recipients` (static list, file with aliases
and catch-all, reload after an edit, HTTP lookup) and `webhook` (a policy service's answers
reach the client; headers added at data; timeout and garbage follow onError).

One server with a listener per setup; the HTTP services are Python servers on loopback. Client
addresses other than 127.0.0.1 come from PROXY v1 headers (`proxyProtocol: true`)."""

import base64
import json
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import RawSMTP, header_fields, parse_queued_id, split_received

DELAY = 0.5  # earlyTalker and tarpit delays of the test listeners, seconds


# ---------------------------------------------------------------------------------------------
# A policy / lookup service on loopback


class Service:
    """A threaded HTTP server answering with `answer(request)` -> (status, body, seconds to
    wait first); it records every request (method, path, query, headers by lower-case name, body)."""

    def __init__(self, answer, tls: dict | None = None):
        self.requests: list[dict] = []
        self.scheme = "https" if tls else "http"
        service = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urllib.parse.urlsplit(self.path)
                request = {"method": method, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                           "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                service.requests.append(request)
                status, out, wait = answer(request)
                if wait:
                    time.sleep(wait)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls["cert"], tls["key"])
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def lookup_answer(request):
    """The recipients lookup: known@, alias@ (-> alice, dave), gone@ (404), anything else 500."""
    address = request["query"].get("address", [""])[0]
    local = address.split("@")[0].lower()
    if local == "known":
        return 200, b"", 0
    if local == "alias":
        return 200, json.dumps({"targets": ["alice@example.test", "dave@example.test"]}).encode(), 0
    if local == "gone":
        return 404, b"not here", 0
    return 500, b"database down", 0


def policy_answer(request):
    """The webhook service: the rcpt hook answers by local part; the data hook adds a header."""
    doc = json.loads(request["body"])
    if doc["hook"] == "data":
        return 200, json.dumps({"action": "continue",
                                "headers": [{"name": "X-Policy-Checked", "value": "yes"}]}).encode(), 0
    local = doc.get("rcpt", "").split("@")[0]
    answers = {
        "reject": {"action": "reject", "code": 554, "enhanced": "5.7.26", "message": "Policy says no"},
        "defer": {"action": "tempfail", "code": 450, "enhanced": "4.2.0", "message": "Mailbox busy"},
        "bye": {"action": "disconnect", "code": 521, "enhanced": "5.7.0", "message": "Go away"},
    }
    if local == "slow":
        return 200, b'{"action": "continue"}', 2.0
    if local == "garbage":
        return 200, b"<html>this is not the contract</html>", 0
    return 200, json.dumps(answers.get(local, {"action": "continue"})).encode(), 0


@pytest.fixture(scope="module")
def lookup():
    s = Service(lookup_answer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def policy():
    s = Service(policy_answer)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def recipients_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipients") / "recipients.txt"
    path.write_text("# known recipients\n"
                    "carol@example.test\n"
                    "sales@example.test: carol@example.test, dave@example.test\n"
                    "@catch.test: carol@example.test\n")
    return path


@pytest.fixture(scope="module")
def server(module_factory, lookup, policy, recipients_file, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text("tok-123\n")
    domains = ["example.test", "catch.test"]
    webhook = {"url": policy.url + "/hook", "timeout": "1s"}
    listeners = [
        {"name": "early", "proxyProtocol": True,
         "plugins": [{"earlyTalker": {"delay": "500ms", "allowClients": ["198.51.100.0/24"]}}]},
        {"name": "tarpit", "proxyProtocol": True,
         "plugins": [{"tarpit": {"delay": "500ms", "clients": ["203.0.113.0/24"]}}]},
        {"name": "rcpt", "acceptedDomains": domains, "plugins": [{"recipients": {
            "domains": domains,
            "addresses": ["alice@example.test"],
            "aliases": [{"address": "team@example.test", "targets": ["alice@example.test", "bob@elsewhere.test"]}],
            "file": str(recipients_file),
        }}]},
        {"name": "rcpthttp", "plugins": [{"recipients": {
            "http": {"url": lookup.url + "/lookup", "timeout": "2s", "onError": "tempfail"}}}]},
        {"name": "hook", "plugins": [{"webhook": dict(
            webhook, hooks=["rcpt", "data"], onError="tempfail", includeBody=True,
            headers=[{"name": "X-Api-Key", "value": "secret"}], tokenFile=str(token))}]},
        {"name": "hookopen", "plugins": [{"webhook": dict(webhook, hooks=["rcpt"], onError="accept")}]},
    ]
    return module_factory.make(listeners=listeners)


# ---------------------------------------------------------------------------------------------
# Helpers


def proxied(server, listener: str, ip: str) -> RawSMTP:
    c = RawSMTP(server.port(listener))
    c.send(f"PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n")
    return c


def timed(f):
    t0 = time.monotonic()
    result = f()
    return result, time.monotonic() - t0


def session(server, listener: str) -> RawSMTP:
    c = RawSMTP(server.port(listener))
    assert c.banner()[0] == 220
    c.ehlo("client.example.org")
    assert c.cmd("MAIL FROM:<sender@client.example.org>")[0] == 250
    return c


def rcpt(server, listener: str, address: str) -> tuple[int, str]:
    with session(server, listener) as c:
        code, lines = c.cmd(f"RCPT TO:<{address}>")
        return code, " ".join(lines)


def send(c: RawSMTP, message: bytes) -> str:
    assert c.cmd("DATA")[0] == 354
    c.send(message + b".\r\n")
    code, lines = c.reply()
    assert code == 250, (code, lines)
    return parse_queued_id(lines[0])


def envelope_recipients(server, qid: str) -> list[str]:
    env, _ = server.spool_file(qid)
    return [r["address"] for r in env["recipients"]]


# ---------------------------------------------------------------------------------------------
# earlyTalker


@pytest.mark.parametrize("pause", [0, 0.1], ids=["with-proxy-header", "during-the-wait"])
def test_early_talker_is_refused_and_disconnected(server, pause):
    before = server.metric("mailroom_inbound_connections_total", listener="early", result="early_talker")
    with proxied(server, "early", "192.0.2.9") as c:
        if pause:
            time.sleep(pause)
        c.send(b"EHLO spammer.example\r\n")
        code, lines = c.reply()
        assert code == 554 and lines[0].startswith("5.5.1"), (code, lines)
        assert "talked before my greeting" in lines[0], lines
        assert c.is_closed(), "connection left open after 554 5.5.1"
    after = server.metric("mailroom_inbound_connections_total", listener="early", result="early_talker")
    assert after == before + 1


def test_patient_client_is_greeted_after_the_delay_allowed_network_at_once(server):
    with proxied(server, "early", "192.0.2.10") as c:
        (code, _), waited = timed(c.banner)
        assert code == 220 and waited >= DELAY * 0.9, (code, waited)
        c.ehlo()
    with proxied(server, "early", "198.51.100.3") as c:
        (code, _), waited = timed(c.banner)
        assert code == 220 and waited < DELAY * 0.6, (code, waited)


# ---------------------------------------------------------------------------------------------
# tarpit


def test_tarpit_delays_every_reply_to_listed_networks_only(server):
    with proxied(server, "tarpit", "203.0.113.5") as c:
        (code, _), waited = timed(c.banner)
        assert code == 220 and waited >= DELAY * 0.9, waited
        (code, _), waited = timed(lambda: c.cmd("EHLO client.example.org"))
        assert code == 250 and waited >= DELAY * 0.9, waited
        (code, _), waited = timed(lambda: c.cmd("NOOP"))
        assert code == 250 and waited >= DELAY * 0.9, waited
    with proxied(server, "tarpit", "198.51.100.7") as c:
        (code, _), waited = timed(c.banner)
        assert code == 220 and waited < DELAY * 0.6, waited
        (code, _), waited = timed(lambda: c.cmd("EHLO client.example.org"))
        assert code == 250 and waited < DELAY * 0.6, waited
    assert server.metric("mailroom_plugin_tarpit_sessions_total", listener="tarpit", reason="listed") >= 1
    assert server.metric("mailroom_plugin_tarpit_delays_total", listener="tarpit") >= 3


# ---------------------------------------------------------------------------------------------
# recipients


@pytest.mark.parametrize("address", ["alice@example.test", "ALICE@Example.Test", "carol@example.test",
                                     "postmaster@example.test", "Postmaster", "someone@catch.test"])
def test_known_recipients_are_accepted(server, address):
    with session(server, "rcpt") as c:
        code, lines = c.cmd(f"RCPT TO:<{address}>")
        assert code == 250, (address, code, lines)


def test_unknown_recipient_is_refused_with_550_5_1_1(server):
    before = server.metric("mailroom_plugin_recipients_lookups_total", listener="rcpt", outcome="unknown")
    code, text = rcpt(server, "rcpt", "nobody@example.test")
    assert (code, text) == (550, "5.1.1 <nobody@example.test>: Recipient address rejected: user unknown")
    after = server.metric("mailroom_plugin_recipients_lookups_total", listener="rcpt", outcome="unknown")
    assert after == before + 1


def test_aliases_and_catch_all_are_queued_for_their_targets(server):
    with session(server, "rcpt") as c:
        for address in ["team@example.test", "Sales@example.test", "anyone@catch.test"]:
            assert c.cmd(f"RCPT TO:<{address}>")[0] == 250, address
        qid = send(c, b"Subject: aliases\r\n\r\nhi\r\n")
    # team -> alice, bob (spec); sales -> carol, dave (file); anyone@catch.test -> carol
    # (file catch-all, already a recipient: queued once).
    assert envelope_recipients(server, qid) == ["alice@example.test", "bob@elsewhere.test",
                                                "carol@example.test", "dave@example.test"]
    for outcome in ("alias", "catch_all"):
        assert server.metric("mailroom_plugin_recipients_lookups_total", listener="rcpt", outcome=outcome) >= 1


def test_recipients_file_is_reloaded_and_a_broken_edit_keeps_the_last_version(server, recipients_file):
    assert rcpt(server, "rcpt", "erin@example.test")[0] == 550
    original = recipients_file.read_text()
    recipients_file.write_text(original + "erin@example.test\n")
    deadline = time.monotonic() + 8
    while rcpt(server, "rcpt", "erin@example.test")[0] != 250:
        assert time.monotonic() < deadline, "the edited file was not reloaded"
        time.sleep(0.3)
    recipients_file.write_text("this line is not an address\n")
    time.sleep(2.5)  # past the reload check
    assert rcpt(server, "rcpt", "erin@example.test")[0] == 250
    assert "recipients file does not parse" in server.stderr_text()
    recipients_file.write_text(original)


def test_http_lookup(server, lookup):
    assert rcpt(server, "rcpthttp", "known@example.test")[0] == 250
    assert lookup.requests[-1]["path"] == "/lookup"
    assert lookup.requests[-1]["query"] == {"address": ["known@example.test"]}
    assert rcpt(server, "rcpthttp", "gone@example.test") == (
        550, "5.1.1 <gone@example.test>: Recipient address rejected: user unknown")
    code, text = rcpt(server, "rcpthttp", "broken@example.test")
    assert code == 451 and text.startswith("4.3.0"), (code, text)
    assert server.metric("mailroom_plugin_recipients_lookups_total", listener="rcpthttp", outcome="error") >= 1
    with session(server, "rcpthttp") as c:
        assert c.cmd("RCPT TO:<alias@example.test>")[0] == 250
        qid = send(c, b"Subject: alias\r\n\r\nhi\r\n")
    assert envelope_recipients(server, qid) == ["alice@example.test", "dave@example.test"]


# ---------------------------------------------------------------------------------------------
# webhook


def test_webhook_answers_reach_the_client(server):
    assert rcpt(server, "hook", "reject@example.test") == (554, "5.7.26 Policy says no")
    assert rcpt(server, "hook", "defer@example.test") == (450, "4.2.0 Mailbox busy")
    with session(server, "hook") as c:
        code, lines = c.cmd("RCPT TO:<bye@example.test>")
        assert (code, lines) == (521, ["5.7.0 Go away"])
        assert c.is_closed(), "disconnect answer left the connection open"
    assert server.metric("mailroom_plugin_webhook_requests_total", listener="hook", hook="rcpt",
                         outcome="reject") >= 1


def test_webhook_sees_the_session_and_adds_headers_at_data(server, policy):
    message = b"From: <sender@client.example.org>\r\nSubject: hooked\r\n\r\nbody line\r\n"
    with session(server, "hook") as c:
        assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
        qid = send(c, message)
    data = [r for r in policy.requests if json.loads(r["body"])["hook"] == "data"][-1]
    doc = json.loads(data["body"])
    assert doc["listener"] == "hook"
    assert doc["client"]["ip"] == "127.0.0.1" and doc["client"]["helo"] == "client.example.org"
    assert doc["client"]["tls"] is False and doc["client"]["authUser"] is None
    assert doc["transaction"] == {"sender": "sender@client.example.org", "recipients": ["bob@example.test"]}
    assert base64.b64decode(doc["body"]) == message and doc["bodyTruncated"] is False
    assert data["headers"]["x-api-key"] == "secret"
    assert data["headers"]["authorization"] == "Bearer tok-123"
    rcpt_doc = json.loads([r for r in policy.requests if json.loads(r["body"])["hook"] == "rcpt"][-1]["body"])
    assert rcpt_doc["rcpt"] == "bob@example.test" and rcpt_doc["transaction"]["recipients"] == []
    _, stored = server.spool_file(qid)
    _, rest = split_received(stored)
    assert ("X-Policy-Checked", "yes") in header_fields(rest)


@pytest.mark.parametrize("local", ["slow", "garbage"])
def test_webhook_failure_follows_on_error(server, local):
    code, text = rcpt(server, "hook", f"{local}@example.test")
    assert code == 451 and text.startswith("4.7.1"), (code, text)
    assert rcpt(server, "hookopen", f"{local}@example.test")[0] == 250
    assert server.metric("mailroom_plugin_webhook_requests_total", listener="hookopen", hook="rcpt",
                         outcome="error") >= 1


@pytest.fixture(scope="module")
def service_ca(tmp_path_factory) -> dict:
    """A CA and a server certificate it signed for 127.0.0.1 (rustls, like browsers, does not
    accept a self-signed CA certificate as the server's own)."""
    d = tmp_path_factory.mktemp("service-ca")
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "2", "-subj", "/CN=test policy CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(d / "tls.key"), "-out", str(d / "tls.csr"), "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-out", str(d / "tls.crt"), "-days", "2", "-extfile", str(d / "ext"))
    return {"ca": d / "ca.crt", "cert": d / "tls.crt", "key": d / "tls.key"}


def test_webhook_over_https_verifies_the_service(mailroom_factory, service_ca, monkeypatch):
    """An https:// service is asked over TLS and its certificate verified: trusted through
    SSL_CERT_FILE its answer reaches the client; untrusted, the request fails and onError
    (tempfail) answers."""
    service = Service(policy_answer, tls=service_ca)
    try:
        hook = {"webhook": {"url": service.url + "/hook", "timeout": "2s", "onError": "tempfail"}}
        monkeypatch.setenv("SSL_CERT_FILE", str(service_ca["ca"]))
        trusting = mailroom_factory.make(plugins=[hook])
        assert rcpt(trusting, "smtp", "reject@example.test") == (554, "5.7.26 Policy says no")
        assert service.requests, "the service was not asked"
        asked = len(service.requests)
        monkeypatch.setenv("SSL_CERT_FILE", "/dev/null")
        distrusting = mailroom_factory.make(plugins=[hook])
        code, text = rcpt(distrusting, "smtp", "reject@example.test")
        assert code == 451 and text.startswith("4.7.1"), (code, text)
        assert len(service.requests) == asked, "an unverified service got the request"
    finally:
        service.stop()

