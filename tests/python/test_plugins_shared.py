"""The `rateLimit` and `greylist` plugins through the real `mailroom serve`. With the JetStream
queue, two processes share one nats-server and a limit or a greylisted triplet holds across
both (KV buckets `<stream>_RATELIMIT` and `<stream>_GREYLIST`); with NATS down each process
follows its `onError`. With the local queue the state is the process's own (memory). Client
addresses come from PROXY v1 headers."""

import re
import time

from conftest import RawSMTP, header_fields, parse_queued_id, split_received
from test_jetstream import nats  # noqa: F401  (the nats-server fixture)

RATE_METRIC = "mailroom_plugin_rate_limit_total"
GREY_METRIC = "mailroom_plugin_greylist_total"


def proxied(server, ip: str) -> tuple[RawSMTP, int, list[str]]:
    """A connection that claims to come from `ip`: (client, greeting code, greeting lines)."""
    c = RawSMTP(server.port())
    fam = "TCP6" if ":" in ip else "TCP4"
    dst = "::1" if fam == "TCP6" else "127.0.0.1"
    c.send(f"PROXY {fam} {ip} {dst} 40000 25\r\n")
    code, lines = c.banner()
    return c, code, lines


def client(server, ip: str, sender: str | None = None) -> RawSMTP:
    """A greeted, EHLO'd connection from `ip`, with MAIL FROM `sender` given and accepted."""
    c, code, lines = proxied(server, ip)
    assert code == 220, (code, lines)
    c.ehlo()
    if sender is not None:
        code, lines = c.cmd(f"MAIL FROM:<{sender}>")
        assert code == 250, (sender, code, lines)
    return c


def mail(c: RawSMTP, sender: str) -> tuple[int, list[str]]:
    return c.cmd(f"MAIL FROM:<{sender}>")


def rcpt(c: RawSMTP, to: str) -> tuple[int, list[str]]:
    return c.cmd(f"RCPT TO:<{to}>")


def data(c: RawSMTP, message: bytes) -> str:
    """Sends DATA; returns the queue id."""
    assert c.cmd("DATA")[0] == 354
    c.send(message + b".\r\n")
    code, lines = c.reply()
    assert code == 250, (code, lines)
    return parse_queued_id(lines[0])


def cluster_server(factory, nats_server, plugins: list, **listener):
    return factory.make(
        proxyProtocol=True, plugins=plugins, **listener,
        extra={"queue": {"jetstream": {"urls": [nats_server.url], "publishTimeout": "2s"}}})


def metric_sum(servers, name: str, **labels) -> float:
    return sum(s.metric(name, **labels) for s in servers)


def rate_limits(on_error: str) -> list:
    return [{"rateLimit": {"onError": on_error, "timeout": "1s", "limits": [
        {"name": "conn", "key": "clientNetwork", "count": "connections", "rate": "3/1d"},
        {"name": "msgs", "key": "clientIp", "count": "messages", "rate": "2/1d"},
        {"name": "rcpts", "key": "sender", "count": "recipients", "rate": "3/1d"},
    ]}}]


def test_rate_limits_hold_across_two_processes_and_follow_on_error(mailroom_factory, nats):
    a = cluster_server(mailroom_factory, nats, rate_limits("tempfail"))
    b = cluster_server(mailroom_factory, nats, rate_limits("accept"))

    # Connections per /24, three a day: two on A and one on B pass, the fourth (on either) is
    # greeted with 421 and closed. Another network is not affected.
    for server, ip in [(a, "192.0.2.1"), (b, "192.0.2.2"), (a, "192.0.2.3")]:
        c, code, lines = proxied(server, ip)
        assert code == 220, (ip, code, lines)
        c.close()
    for server, ip in [(b, "192.0.2.4"), (a, "192.0.2.5")]:
        c, code, lines = proxied(server, ip)
        assert (code, lines) == (421, ["4.7.0 conn: rate limit exceeded, try again later"])
        assert c.is_closed(), "closed after the 421 greeting"
    c, code, _ = proxied(a, "198.51.100.1")
    assert code == 220
    c.close()

    # Messages per client address, two a day, counted at MAIL FROM on either process.
    with client(a, "203.0.113.7") as c:
        assert mail(c, "one@client.test")[0] == 250
    with client(b, "203.0.113.7") as c:
        assert mail(c, "two@client.test")[0] == 250
        assert c.cmd("RSET")[0] == 250
        assert mail(c, "three@client.test") == (451, ["4.7.1 msgs: rate limit exceeded, try again later"])
    with client(a, "203.0.113.7") as c:
        assert mail(c, "four@client.test")[0] == 451
    with client(a, "100.64.1.8") as c:
        assert mail(c, "five@client.test")[0] == 250, "another address has its own count"

    # Recipients per sender, three a day, counted at RCPT TO.
    with client(a, "198.51.100.2") as c:
        assert mail(c, "Bulk@Client.test")[0] == 250
        assert rcpt(c, "a@example.test")[0] == 250
        assert rcpt(c, "b@example.test")[0] == 250
    with client(b, "198.51.100.3") as c:
        assert mail(c, "bulk@client.test")[0] == 250
        assert rcpt(c, "c@example.test")[0] == 250
        assert rcpt(c, "d@example.test") == (451, ["4.7.1 rcpts: rate limit exceeded, try again later"])
        assert rcpt(c, "d@example.test")[0] == 451, "refused attempts are not counted, still over"

    assert metric_sum([a, b], RATE_METRIC, limit="conn", outcome="exceeded") == 2
    assert metric_sum([a, b], RATE_METRIC, limit="msgs", outcome="pass") == 5
    assert metric_sum([a, b], RATE_METRIC, limit="msgs", outcome="exceeded") == 2
    assert metric_sum([a, b], RATE_METRIC, limit="rcpts", outcome="exceeded") == 2

    # NATS down: A (onError: tempfail) refuses within its 1s timeout, B (accept) lets through.
    nats.stop()
    started = time.monotonic()
    c, code, lines = proxied(a, "100.64.0.1")
    assert (code, lines) == (421, ["4.7.0 conn: rate limit could not be checked, try again later"])
    c.close()
    assert time.monotonic() - started < 5
    with client(b, "100.64.0.1") as c:
        assert mail(c, "six@client.test")[0] == 250
        assert rcpt(c, "e@example.test")[0] == 250
    assert a.metric(RATE_METRIC, limit="conn", outcome="error") >= 1
    assert b.metric(RATE_METRIC, limit="rcpts", outcome="error") >= 1


GREYLISTED_RE = re.compile(r"^4\.7\.1 Greylisted, try again in (\d+) seconds$")


def greylisted(reply: tuple[int, list[str]]) -> int:
    """The wait a greylisting reply names (asserts it is one)."""
    code, lines = reply
    m = GREYLISTED_RE.match(lines[0]) if code == 451 and lines else None
    assert m, reply
    return int(m.group(1))


def message(subject: str, extra: str = "") -> bytes:
    return (f"From: <sender@client.test>\r\nSubject: {subject}\r\n{extra}\r\nbody\r\n").encode()


def test_greylist_holds_across_two_processes_and_auto_allows_networks(mailroom_factory, nats):
    plugins = [{"greylist": {"delay": "2s", "autoAllowAfter": 2}}]
    a = cluster_server(mailroom_factory, nats, plugins)
    b = cluster_server(mailroom_factory, nats, plugins)

    with client(a, "192.0.2.10", "sender@client.test") as c:
        assert greylisted(rcpt(c, "u1@example.test")) == 2
        assert greylisted(rcpt(c, "u2@example.test")) == 2
        assert rcpt(c, "postmaster@example.test")[0] == 250, "never greylisted"
        assert rcpt(c, "Abuse@example.test")[0] == 250, "never greylisted"
    first = time.monotonic()
    # A second later the other process knows the triplet (same /24, another address): too
    # early, one second to go (a process of its own would call it new: two seconds).
    time.sleep(1.0)
    with client(b, "192.0.2.11", "SENDER@client.test") as c:
        assert greylisted(rcpt(c, "u1@example.test")) == 1
    time.sleep(max(0.0, first + 2.2 - time.monotonic()))

    # After the delay the retry passes, on either process; the message says it was delayed.
    with client(b, "192.0.2.12", "sender@client.test") as c:
        assert rcpt(c, "u1@example.test")[0] == 250
        qid = data(c, message("retried", "X-Mailroom-Greylist: forged\r\n"))
    _, stored = b.queue_show(qid)
    fields = header_fields(split_received(stored)[1])
    delays = [v for n, v in fields if n.lower() == "x-mailroom-greylist"]
    assert len(delays) == 1 and re.fullmatch(r"delayed [23]s", delays[0]), fields
    with client(a, "192.0.2.10", "sender@client.test") as c:
        assert rcpt(c, "u1@example.test")[0] == 250, "a passed triplet keeps passing"
        qid = data(c, message("known"))
        assert mail(c, "sender@client.test")[0] == 250
        assert rcpt(c, "u2@example.test")[0] == 250
    _, stored = a.queue_show(qid)
    assert b"X-Mailroom-Greylist" not in stored, "not delayed this time"

    # Two triplets passed from 192.0.2.0/24: the network is allowed without greylisting; an
    # unknown network still is greylisted.
    with client(b, "192.0.2.77", "new@elsewhere.test") as c:
        assert rcpt(c, "u3@example.test")[0] == 250
    with client(a, "198.51.100.5", "new@elsewhere.test") as c:
        assert greylisted(rcpt(c, "u3@example.test")) == 2

    servers = [a, b]
    assert metric_sum(servers, GREY_METRIC, outcome="new") == 3
    assert metric_sum(servers, GREY_METRIC, outcome="early") == 1
    assert metric_sum(servers, GREY_METRIC, outcome="passed") == 3
    assert metric_sum(servers, GREY_METRIC, outcome="allowed") == 1
    assert metric_sum(servers, GREY_METRIC, outcome="skipped") == 2


def test_greylist_fails_open_or_closed_without_nats(mailroom_factory, nats):
    closed = cluster_server(mailroom_factory, nats, [{"greylist": {"onError": "tempfail", "timeout": "1s"}}])
    open_ = cluster_server(mailroom_factory, nats, [{"greylist": {"timeout": "1s"}}])
    nats.stop()
    with client(closed, "192.0.2.20", "s@client.test") as c:
        assert rcpt(c, "u@example.test") == (451, ["4.7.1 Greylisting is unavailable, try again later"])
    with client(open_, "192.0.2.20", "s@client.test") as c:
        assert rcpt(c, "u@example.test")[0] == 250
    assert closed.metric(GREY_METRIC, outcome="error") == 1
    assert open_.metric(GREY_METRIC, outcome="error") == 1


def test_rate_limit_with_the_local_queue_is_per_process(mailroom_factory):
    server = mailroom_factory.make(proxyProtocol=True, plugins=[{"rateLimit": {
        "allowClients": ["198.51.100.0/24"],
        "limits": [{"name": "per-domain", "key": "senderDomain", "count": "messages", "rate": "2/1d",
                    "window": "sliding"}]}}])
    with client(server, "192.0.2.1") as c:
        for sender in ["a@big.test", "b@BIG.test"]:
            assert mail(c, sender)[0] == 250
            assert c.cmd("RSET")[0] == 250
        assert mail(c, "c@big.test") == (451, ["4.7.1 per-domain: rate limit exceeded, try again later"])
        assert mail(c, "a@small.test")[0] == 250, "another domain has its own count"
        assert c.cmd("RSET")[0] == 250
        assert mail(c, "")[0] == 250, "the null sender has no domain to count"
    with client(server, "198.51.100.1") as c:
        for _ in range(4):
            assert mail(c, "d@big.test")[0] == 250, "allowClients are exempt"
            assert c.cmd("RSET")[0] == 250
    assert server.metric(RATE_METRIC, limit="per-domain", outcome="exempt") == 4
    # The counters lived in the process: a restart starts from zero.
    server.restart()
    with client(server, "192.0.2.1") as c:
        assert mail(c, "e@big.test")[0] == 250


def test_greylist_with_the_local_queue(mailroom_factory):
    server = mailroom_factory.make(proxyProtocol=True, plugins=[{"greylist": {
        "delay": "1s", "retryWindow": "3s", "allowClients": ["198.51.100.0/24"],
        "allowRecipients": ["boss@example.test"]}}])
    with client(server, "192.0.2.1", "s@client.test") as c:
        assert greylisted(rcpt(c, "bob@example.test")) == 1
        assert rcpt(c, "BOSS@example.test")[0] == 250, "allowRecipients"
        assert rcpt(c, "postmaster")[0] == 250, "<postmaster> is never greylisted"
        assert rcpt(c, "abuse@example.test")[0] == 451, "the list replaces the defaults"
    first = time.monotonic()
    with client(server, "192.0.2.1", "") as c:
        assert greylisted(rcpt(c, "bob@example.test")) == 1, "the null sender is its own triplet"
    with client(server, "198.51.100.1", "s@client.test") as c:
        assert rcpt(c, "bob@example.test")[0] == 250, "allowClients"
    time.sleep(max(0.0, first + 1.2 - time.monotonic()))
    with client(server, "192.0.2.1", "s@client.test") as c:
        assert rcpt(c, "bob@example.test")[0] == 250
        qid = data(c, message("after the delay"))
    _, stored = server.queue_show(qid)
    assert re.search(rb"\r\nX-Mailroom-Greylist: delayed [12]s\r\n", b"\r\n" + stored), stored[:400]
    # The null sender's triplet was not retried within the 3s retry window: new again.
    time.sleep(max(0.0, first + 3.5 - time.monotonic()))
    with client(server, "192.0.2.1", "") as c:
        assert greylisted(rcpt(c, "bob@example.test")) == 1
    assert server.metric(GREY_METRIC, outcome="new") == 4
    assert server.metric(GREY_METRIC, outcome="passed") == 1
    assert server.metric(GREY_METRIC, outcome="skipped") == 3
