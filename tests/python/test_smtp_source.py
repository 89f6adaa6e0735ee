"""Load from Postfix's smtp-source (Debian's postfix package), a real SMTP client: every
message it sends is acknowledged and is in the spool afterwards."""

import shutil
import subprocess

import pytest

SMTP_SOURCE = shutil.which("smtp-source") or ("/usr/sbin/smtp-source" if shutil.os.path.exists("/usr/sbin/smtp-source") else None)
pytestmark = pytest.mark.skipif(SMTP_SOURCE is None, reason="smtp-source is not installed (apt-get install -y postfix)")


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(limits={"maxConnectionsPerIp": 200})


def run_source(server, *args):
    cmd = [SMTP_SOURCE, *args, "-f", "sender@client.example.org", "-t", "rcpt@example.test",
           f"127.0.0.1:{server.port()}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{cmd} failed: {p.stdout}\n{p.stderr}"
    return p


@pytest.mark.parametrize("sessions, messages, size, reuse", [
    (1, 50, 1024, False),
    (20, 400, 1024, False),
    (10, 40, 100 * 1024, False),
    (1, 100, 2048, True),
], ids=["1-session", "20-sessions", "100KB", "one-connection"])
def test_every_message_is_acknowledged_and_spooled(server, sessions, messages, size, reuse):
    before = server.queue_stats()["messages"]
    accepted_before = server.metric("mailroom_inbound_messages_accepted_total")
    args = ["-s", str(sessions), "-m", str(messages), "-l", str(size)]
    if reuse:
        args.append("-d")
    run_source(server, *args)
    after = server.queue_stats()
    assert after["messages"] - before == messages
    assert server.metric("mailroom_inbound_messages_accepted_total") - accepted_before == messages
    newest = server.queue_list()[-1]
    assert newest["sender"] == "sender@client.example.org"
    assert newest["size"] > size
