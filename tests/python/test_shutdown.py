"""Graceful shutdown on SIGTERM/SIGINT: idle sessions get 421 4.3.2, transactions in flight may
finish within timeouts.shutdownGrace, then the process exits 0."""

import signal
import socket
import time

import pytest

from conftest import HOSTNAME, RawSMTP, parse_queued_id, split_received

BODY_1 = b"From: alice@client.example.org\r\nSubject: in flight\r\n\r\nfirst half\r\n"
BODY_2 = b"second half, sent after SIGTERM\r\n.dotted\r\n"
BODY_2_WIRE = BODY_2.replace(b"\r\n.", b"\r\n..")  # dot-stuffed


def open_idle(server) -> RawSMTP:
    c = RawSMTP(server.port())
    assert c.banner()[0] == 220
    c.ehlo()
    return c


def open_mid_data(server) -> RawSMTP:
    c = open_idle(server)
    assert c.cmd("MAIL FROM:<alice@client.example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(BODY_1)
    return c


def expect_421_432_and_close(c: RawSMTP, within: float):
    t0 = time.monotonic()
    code, lines = c.reply()
    assert code == 421, (code, lines)
    assert lines[0].startswith("4.3.2"), lines
    assert HOSTNAME in lines[0]
    assert time.monotonic() - t0 < within
    assert c.is_closed(timeout=within), "connection not closed after 421"


def wait_exit(server, timeout: float) -> int:
    try:
        return server.proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001
        pytest.fail(f"mailroom did not exit within {timeout}s after SIGTERM\n{server.stderr_text()[-4000:]}")


def test_sigterm_idle_gets_421_in_flight_finishes(mailroom_factory):
    server = mailroom_factory.make(timeouts={"shutdownGrace": "5s"})
    idle = open_idle(server)
    busy = open_mid_data(server)
    time.sleep(0.2)
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)

    # the idle client is told at once
    expect_421_432_and_close(idle, within=3.0)
    idle.close()

    # not ready any more while draining (readiness must drop so load balancers stop sending)
    try:
        status, _ = server.http_get("/readyz", timeout=2.0)
        assert status != 200, "/readyz still 200 during shutdown"
    except OSError:
        pass  # HTTP already closed: also not ready

    # the client in the middle of DATA may finish its message
    time.sleep(0.5)
    busy.send(BODY_2_WIRE + b".\r\n")
    code, lines = busy.reply()
    assert code == 250, (code, lines)
    qid = parse_queued_id(lines[0])
    assert time.monotonic() - t0 < 5.0
    # then it is idle, and told to go away (or just closed)
    try:
        code, lines = busy.reply()
        assert code == 421 and lines[0].startswith("4.3.2"), (code, lines)
    except (EOFError, ConnectionResetError):
        pass
    busy.close()

    rc = wait_exit(server, 10)
    assert rc == 0, server.stderr_text()[-4000:]
    # all sessions ended, so the process need not wait for the whole grace period
    assert time.monotonic() - t0 < 4.5, f"exit took {time.monotonic() - t0:.1f}s"
    env, stored = server.queue_show(qid)
    assert split_received(stored)[1] == BODY_1 + BODY_2


def test_no_new_connections_after_sigterm(mailroom_factory):
    """During the grace period a new client is refused at once (so it can try another MX), not
    left hanging in the listen backlog."""
    server = mailroom_factory.make(timeouts={"shutdownGrace": "5s"})
    busy = open_mid_data(server)  # keeps the process alive during the grace period
    server.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.alive()
    outcome = None
    try:
        with RawSMTP(server.port(), timeout=3) as c:
            data = c.sock.recv(1024)
            outcome = data
    except (ConnectionRefusedError, ConnectionResetError):
        outcome = "refused"
    except socket.timeout:
        outcome = "hung"
    finally:
        busy.send(BODY_2_WIRE + b".\r\n")
        assert busy.reply()[0] == 250
        busy.close()
        assert wait_exit(server, 10) == 0
    assert outcome == "refused" or outcome == b"" or outcome.startswith(b"421 4.3.2"), \
        f"new connection during shutdown: {outcome!r}"


def test_grace_period_expires(mailroom_factory):
    """A transaction that does not finish within shutdownGrace is cut with 421 4.3.2 and not
    queued; the process still exits 0."""
    server = mailroom_factory.make(timeouts={"shutdownGrace": "1s"})
    busy = open_mid_data(server)
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    expect_421_432_and_close(busy, within=4.0)
    elapsed = time.monotonic() - t0
    assert 0.8 <= elapsed < 4.0, elapsed
    busy.close()
    assert wait_exit(server, 10) == 0
    assert server.queue_stats()["messages"] == 0


def test_sigint_is_graceful_too(mailroom_factory):
    server = mailroom_factory.make(timeouts={"shutdownGrace": "5s"})
    idle = open_idle(server)
    server.signal(signal.SIGINT)
    expect_421_432_and_close(idle, within=3.0)
    idle.close()
    assert wait_exit(server, 10) == 0


def test_sigterm_without_clients_exits_promptly(mailroom_factory):
    server = mailroom_factory.make(timeouts={"shutdownGrace": "30s"})
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    assert wait_exit(server, 10) == 0
    assert time.monotonic() - t0 < 3.0
