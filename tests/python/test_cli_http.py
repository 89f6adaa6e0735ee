"""`mailroom check`, `mailroom queue`, the HTTP endpoints and the delivery log."""

import smtplib
import subprocess
import textwrap

import pytest

from conftest import IO_TIMEOUT, MAILROOM_BIN, REPO, parse_queued_id

LISTENER = """\
listeners:
  - name: smtp
    address: "127.0.0.1:2525"
    acceptedDomains: [example.test]
"""


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MAILROOM_BIN), "check", "--config", str(path)], capture_output=True, text=True,
                          timeout=30)


def check_text(tmp_path, text: str) -> subprocess.CompletedProcess:
    p = tmp_path / "mailroom.yaml"
    p.write_text(textwrap.dedent(text))
    return check(p)


def test_check_default_config_ok():
    p = check(REPO / "config" / "mailroom.yaml")
    assert p.returncode == 0, p.stderr
    assert "ok" in p.stdout


def test_check_embedded_default_ok(tmp_path):
    p = subprocess.run([str(MAILROOM_BIN), "check"], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr


def test_check_fixture_config_ok(mailroom_factory):
    """The configs the tests run with (TLS, auth, several listeners) pass `check`."""
    s = mailroom_factory.make(start=False, listeners=[
        {"name": "smtp", "tls": True, "auth": True},
        {"name": "submission", "mode": "submission", "tls": True, "auth": True},
    ])
    s.write_config()
    p = check(s.config_path)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("text, path, words", [
    pytest.param("bogusTop: 1\n" + LISTENER, "bogusTop", ["unknown field"], id="unknown-top-level-key"),
    pytest.param(LISTENER + "    limits:\n      maxMessageSiz: 10\n", "listeners[0].limits.maxMessageSiz",
                 ["unknown field"], id="unknown-nested-key"),
    pytest.param(LISTENER + "    limits:\n      maxMessageSize: \"12 potatoes\"\n",
                 "listeners[0].limits.maxMessageSize", ["12 potatoes"], id="bad-size"),
    pytest.param(LISTENER + "    limits:\n      maxMessageSize: 2GiB\n", "listeners[0].limits.maxMessageSize",
                 ["range"], id="size-out-of-range"),
    pytest.param(LISTENER + "    timeouts:\n      command: \"5 parsecs\"\n", "listeners[0].timeouts.command",
                 ["5 parsecs"], id="bad-duration"),
    pytest.param(LISTENER + "    limits:\n      maxRecipients: 5\n", "listeners[0].limits.maxRecipients",
                 ["100"], id="mx-max-recipients-below-rfc-minimum"),
    pytest.param(LISTENER.replace("mode: mx", "") + "    mode: submission\n", "listeners[0].auth",
                 ["submission"], id="submission-without-auth"),
    pytest.param(LISTENER.replace("name: smtp", "name: Bad_Name"), "listeners[0].name", ["Bad_Name"],
                 id="bad-listener-name"),
    pytest.param(LISTENER.replace('"127.0.0.1:2525"', '"nowhere"'), "listeners[0].address", ["nowhere"],
                 id="bad-address"),
    pytest.param(LISTENER + "    plugins:\n      - access: {}\n        headers: {}\n", "listeners[0].plugins[0]",
                 ["exactly one"], id="plugin-with-two-kinds"),
    pytest.param(LISTENER + "    plugins:\n      - dnsbl: {zones: [{name: zen.example, weight: 0}]}\n",
                 "listeners[0].plugins[0].dnsbl.zones[0].weight", [], id="plugin-bad-weight"),
    pytest.param(LISTENER + "    plugins:\n      - dmarc: {enforce: maybe}\n", "listeners[0].plugins[0].dmarc.enforce",
                 ["boolean"], id="plugin-bad-type"),
    pytest.param(LISTENER + "    plugins:\n      - recipients: {file: /nonexistent/recipients}\n",
                 "listeners[0].plugins[0].recipients.file", ["/nonexistent/recipients"], id="plugin-missing-file"),
    pytest.param(LISTENER + "    plugins:\n      - rateLimit: {limits: [{name: a, key: sender, count: connections, rate: 5/1m}]}\n",
                 "listeners[0].plugins[0].rateLimit.limits[0]", ["connections"], id="plugin-impossible-limit"),
    pytest.param(LISTENER + 'http:\n  address: "127.0.0.1:2525"\n', "http.address", ["already used"],
                 id="http-address-clash"),
    pytest.param(LISTENER + "    tls:\n      certFile: /nonexistent/tls.crt\n      keyFile: /nonexistent/tls.key\n",
                 "listeners[0].tls", ["/nonexistent/tls.crt"], id="missing-tls-files"),
])
def test_check_bad_config(tmp_path, text, path, words):
    p = check_text(tmp_path, text)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert path in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_check_submission_without_auth_names_both_fields(tmp_path):
    p = check_text(tmp_path, LISTENER + "    mode: submission\n")
    assert p.returncode == 1
    assert "listeners[0].auth" in p.stderr and "listeners[0].tls" in p.stderr, p.stderr


def bad_users_file_check(tmp_path, tls_files):
    users = tmp_path / "users"
    users.write_text("alice:not-a-hash\n")
    return check_text(tmp_path, LISTENER + textwrap.indent(textwrap.dedent(f"""\
        tls:
          certFile: {tls_files['cert']}
          keyFile: {tls_files['key']}
        auth:
          usersFile: {users}
        """), "    ")), users


def test_check_bad_users_file(tmp_path, tls_files):
    p, users = bad_users_file_check(tmp_path, tls_files)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert str(users) in p.stderr and "line 1" in p.stderr, p.stderr


def test_check_bad_users_file_names_field_path(tmp_path, tls_files):
    p, _ = bad_users_file_check(tmp_path, tls_files)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "listeners[0].auth" in p.stderr, p.stderr


def test_check_missing_file():
    p = subprocess.run([str(MAILROOM_BIN), "check", "--config", "/nonexistent/mailroom.yaml"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "/nonexistent/mailroom.yaml" in p.stderr


def test_health_endpoints_and_metrics(mailroom):
    assert mailroom.http_get("/healthz")[0] == 200
    assert mailroom.http_get("/readyz")[0] == 200
    status, text = mailroom.http_get("/metrics")
    assert status == 200
    # a fresh server has accepted nothing (the counter may not be exported before its first use)
    if "mailroom_inbound_messages_accepted_total{" in text:
        assert mailroom.metric("mailroom_inbound_messages_accepted_total") == 0
    ids = []
    with smtplib.SMTP("127.0.0.1", mailroom.port(), timeout=IO_TIMEOUT) as s:
        for i in range(3):
            s.ehlo_or_helo_if_needed()
            s.mail("alice@client.example.org")
            s.rcpt("bob@example.test")
            code, resp = s.data(f"Subject: metric {i}\r\n\r\nx\r\n".encode())
            assert code == 250
            ids.append(parse_queued_id(resp.decode()))
        # a refused one does not count
        s.mail("alice@client.example.org")
        assert s.rcpt("x@elsewhere.example.net")[0] == 550
        s.rset()
    assert mailroom.metric("mailroom_inbound_messages_accepted_total") == 3
    status, text = mailroom.http_get("/metrics")
    assert 'mailroom_inbound_messages_accepted_total{listener="smtp"} 3' in text, text
    assert mailroom.http_get("/nonexistent")[0] == 404


def test_delivery_log_reception_lines(mailroom):
    ids = []
    with smtplib.SMTP("127.0.0.1", mailroom.port(), local_hostname="client.example.org", timeout=IO_TIMEOUT) as s:
        s.ehlo()
        for i in range(2):
            s.mail("alice@client.example.org")
            s.rcpt("bob@example.test")
            s.rcpt("carol@example.test")
            code, resp = s.data(f"Message-ID: <log{i}@client.example.org>\r\nSubject: log\r\n\r\nx\r\n".encode())
            assert code == 250
            ids.append(parse_queued_id(resp.decode()))
    lines = [l for l in mailroom.delivery_log_lines() if l.get("event") == "reception"]
    by_id = {l["queue_id"]: l for l in lines}
    assert set(ids) <= set(by_id), lines
    for i, qid in enumerate(ids):
        l = by_id[qid]
        assert l["sender"] == "alice@client.example.org"
        assert l["recipients"] == ["bob@example.test", "carol@example.test"]
        assert l["message_id"] == f"<log{i}@client.example.org>"
        assert l["listener"] == "smtp"
        assert l["client_ip"] == "127.0.0.1"
        assert l["tls"] is False
        assert "ts" in l
    # nothing on stdout when the delivery log goes to a file
    assert '"reception"' not in mailroom.stdout_path.read_text()


def test_queue_cli(mailroom):
    with smtplib.SMTP("127.0.0.1", mailroom.port(), timeout=IO_TIMEOUT) as s:
        s.sendmail("a@client.example.org", ["x@example.test", "y@EXAMPLE.TEST"], b"Subject: q\r\n\r\nq\r\n")
    stats = mailroom.queue_stats()
    assert stats["backend"] == "local"
    assert stats["messages"] == 1
    assert stats["bytes"] > 0
    assert stats["by_domain"] == {"example.test": 1}
    assert stats["oldest_received_at"]
    assert 0 <= stats["oldest_age_seconds"] < 60
    # one destination entry, due now, nobody delivering it
    assert stats["backlog"] == {"default": {"ready": 1, "deferred": 0, "leased": 0}}
    (entry,) = mailroom.queue_list()
    assert entry["recipients"] == 2 and entry["domains"] == ["example.test"]
    assert entry["size"] == stats["bytes"]
    head, body = mailroom.queue_show_full(entry["id"])
    assert len(body) == entry["size"]
    assert head["envelope"]["id"] == entry["id"]
    (e,) = head["entries"]
    assert e["domain"] == "example.test"
    assert e["recipients"] == ["x@example.test", "y@EXAMPLE.TEST"]
    assert e["attempts"] == 0 and e["last_response"] is None and e["bounce_requested"] is None
    # unknown and malformed ids fail with a message
    p = mailroom.queue_cli("show", "01ARZ3NDEKTSV4RRFFQ69G5FAV", check=False)
    assert p.returncode != 0 and b"01ARZ3NDEKTSV4RRFFQ69G5FAV" in p.stderr
    p = mailroom.queue_cli("show", "not-an-id", check=False)
    assert p.returncode != 0 and b"not-an-id" in p.stderr


@pytest.fixture
def two_domain_server(mailroom_factory):
    listener = {"name": "smtp", "acceptedDomains": ["example.test", "other.example"]}
    return mailroom_factory.make(listeners=[listener])


def test_queue_retry_and_bounce(two_domain_server):
    server = two_domain_server
    """retry/bounce change the spool, so the local backend refuses them while a server holds
    it (naming the lock); with the server stopped they work and `show` reflects them."""
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=IO_TIMEOUT) as s:
        s.sendmail("a@client.example.org", ["x@example.test", "z@other.example"], b"Subject: b\r\n\r\nb\r\n")
    (entry,) = server.queue_list()
    qid = entry["id"]
    busy = server.queue_cli("bounce", qid, check=False)
    assert busy.returncode != 0
    assert b"lock" in busy.stderr, busy.stderr
    assert server.stop() == 0
    # nothing is deferred yet: retry changes nothing, and says so
    p = server.queue_cli("retry", qid)
    assert p.stdout.startswith(b"0 deferred entries of 1 messages"), p.stdout
    p = server.queue_cli("retry", "--all")
    assert b"of 1 messages" in p.stdout, p.stdout
    p = server.queue_cli("bounce", qid, "--reason", "spam run")
    assert p.stdout.startswith(b"2 entries"), p.stdout
    head, _ = server.queue_show_full(qid)
    assert [e["domain"] for e in head["entries"]] == ["example.test", "other.example"]
    assert all(e["bounce_requested"] == "spam run" for e in head["entries"])
    # the mark is durable: a new server keeps it
    server.start()
    head, _ = server.queue_show_full(qid)
    assert all(e["bounce_requested"] == "spam run" for e in head["entries"])
    unknown = server.queue_cli("retry", "not-an-id", check=False)
    assert unknown.returncode != 0 and b"not-an-id" in unknown.stderr


def test_listener_delivery_policy_is_recorded(mailroom_factory):
    """A listener's deliveryPolicy names the policy its messages are queued under."""
    server = mailroom_factory.make(deliveryPolicy="bulk", extra={"policies": [{"name": "bulk", "hold": True}]})
    with smtplib.SMTP("127.0.0.1", server.port(), timeout=IO_TIMEOUT) as s:
        s.sendmail("a@client.example.org", ["x@example.test"], b"Subject: p\r\n\r\np\r\n")
    stats = server.queue_stats()
    assert stats["backlog"] == {"bulk": {"ready": 1, "deferred": 0, "leased": 0}}, stats
    (entry,) = server.queue_list()
    env, _ = server.queue_show(entry["id"])
    assert env["policy"] == "bulk"


def test_check_names_unreadable_policy_files(tmp_path):
    """`mailroom check` opens what the delivery workers would read, and names the field."""
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(
        "listeners:\n- name: smtp\n  address: 127.0.0.1:2525\n  acceptedDomains: [example.test]\n"
        "  deliveryPolicy: out\n"
        "policies:\n- name: out\n  routing:\n    relay: {host: smart.example.net, user: u, "
        f"passwordFile: {tmp_path / 'missing'}}}\n"
        "- name: ca\n  routing:\n    relay: {host: smart.example.net, "
        f"caFile: {tmp_path / 'missing-ca.pem'}}}\n"
    )
    p = subprocess.run([MAILROOM_BIN, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "policies[out].routing.relay.passwordFile" in p.stderr, p.stderr
    assert "policies[ca].routing.relay.caFile" in p.stderr, p.stderr
    (tmp_path / "missing").write_text("s3cret\n")
    cfg.write_text(cfg.read_text().split("- name: ca")[0])
    p = subprocess.run([MAILROOM_BIN, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "1 delivery policy" in p.stdout
