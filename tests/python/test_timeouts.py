"""RFC 5321 4.5.3.2 timeouts: an idle client is told `421 4.4.2` and disconnected."""

import time

import pytest

from conftest import HOSTNAME, RawSMTP


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(timeouts={"command": "1s", "dataBlock": "1s", "session": "3s"})


def expect_timeout(c: RawSMTP, lo: float, hi: float):
    t0 = time.monotonic()
    code, lines = c.reply()
    elapsed = time.monotonic() - t0
    assert code == 421, (code, lines)
    assert lines[0].startswith("4.4.2"), lines
    assert HOSTNAME in lines[0]
    assert lo <= elapsed <= hi, f"timeout after {elapsed:.2f}s, expected {lo}..{hi}s"
    assert c.is_closed(timeout=2.0), "connection not closed after 421 4.4.2"


def test_idle_after_banner(server):
    with RawSMTP(server.port(), timeout=10) as c:
        assert c.banner()[0] == 220
        expect_timeout(c, 0.7, 3.0)


def test_idle_after_ehlo(server):
    with RawSMTP(server.port(), timeout=10) as c:
        c.banner()
        c.ehlo()
        time.sleep(0.5)
        assert c.cmd("NOOP")[0] == 250  # activity restarts the command timer
        expect_timeout(c, 0.7, 3.0)


def test_partial_command_line(server):
    with RawSMTP(server.port(), timeout=10) as c:
        c.banner()
        c.send(b"EHLO client.exa")  # no CRLF
        expect_timeout(c, 0.7, 3.0)


def test_stalled_data(server):
    with RawSMTP(server.port(), timeout=10) as c:
        c.banner()
        c.ehlo()
        c.cmd("MAIL FROM:<alice@client.example.org>")
        c.cmd("RCPT TO:<bob@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: stalled\r\n\r\nhalf a mess")
        expect_timeout(c, 0.7, 3.0)
    assert server.queue_stats()["messages"] == 0


def test_session_timeout(server):
    """A client that stays busy is still disconnected when the session time (3s) is up."""
    with RawSMTP(server.port(), timeout=10) as c:
        t0 = time.monotonic()
        c.banner()
        c.ehlo()
        code = 250
        while time.monotonic() - t0 < 8:
            time.sleep(0.4)
            try:
                code, lines = c.cmd("NOOP")
            except (EOFError, ConnectionResetError, BrokenPipeError):
                pytest.fail("connection closed without 421")
            if code != 250:
                break
        elapsed = time.monotonic() - t0
        assert code == 421 and lines[0].startswith("4.4.2"), (code, lines)
        assert 2.5 <= elapsed <= 5.0, elapsed
