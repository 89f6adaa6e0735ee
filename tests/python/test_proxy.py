"""PROXY protocol v1/v2 on a listener with `proxyProtocol: true`: the client address it names is
the one used for relayNetworks, the per-IP limit, the envelope and the Received: field."""

import ipaddress
import struct

import pytest

from conftest import RawSMTP, parse_queued_id, split_received

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module")
def server(module_factory):
    return module_factory.make(proxyProtocol=True, relayNetworks=["203.0.113.0/24"],
                               limits={"maxConnectionsPerIp": 2})


def v1(src: str, sport: int = 40000) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if fam == "TCP6" else "127.0.0.1"
    return f"PROXY {fam} {src} {dst} {sport} 25\r\n".encode()


def v2(src: str, sport: int = 40000, local: bool = False) -> bytes:
    ip = ipaddress.ip_address(src)
    if ip.version == 4:
        fam, addrs = 0x11, ip.packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", sport, 25)
    else:
        fam, addrs = 0x21, ip.packed + ipaddress.ip_address("::1").packed + struct.pack("!HH", sport, 25)
    ver_cmd = 0x20 if local else 0x21
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(addrs)) + addrs


def connect(server, header: bytes) -> RawSMTP:
    c = RawSMTP(server.port())
    c.send(header)
    code, lines = c.banner()
    assert code == 220, (code, lines)
    return c


def send_one(c: RawSMTP, rcpt: str) -> tuple[int, list[str], str | None]:
    _, ehlo = c.ehlo()
    assert c.cmd("MAIL FROM:<a@client.example.org>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
    if code != 250:
        return code, lines, None
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n")
    code, lines = c.reply()
    assert code == 250, (code, lines)
    return code, ehlo, parse_queued_id(lines[0])


@pytest.mark.parametrize("header, ip", [
    (v1("203.0.113.7"), "203.0.113.7"),
    (v2("203.0.113.8"), "203.0.113.8"),
])
def test_proxied_client_in_relay_network_may_relay(server, header, ip):
    with connect(server, header) as c:
        code, ehlo, qid = send_one(c, "someone@far-away.example.net")
        assert qid, (code, ehlo)
        assert f"[{ip}]" in ehlo[0], ehlo
    env, stored = server.queue_show(qid)
    assert env["client_ip"] == ip
    assert f"([{ip}])".encode() in split_received(stored)[0]


@pytest.mark.parametrize("header", [v1("198.51.100.9"), v2("2001:db8::1")])
def test_proxied_client_outside_relay_network_is_denied(server, header):
    with connect(server, header) as c:
        code, lines, qid = send_one(c, "someone@far-away.example.net")
        assert code == 550 and lines[0].startswith("5.7.1"), (code, lines)


def test_proxied_ipv6_client_recorded(server):
    with connect(server, v2("2001:db8::1")) as c:
        _, _, qid = send_one(c, "bob@example.test")
    env, stored = server.queue_show(qid)
    assert env["client_ip"] == "2001:db8::1"


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2("192.0.2.1", local=True)])
def test_unknown_or_local_uses_socket_peer(server, header):
    with connect(server, header) as c:
        code, lines, _ = send_one(c, "someone@far-away.example.net")
        assert code == 550  # 127.0.0.1 is not in relayNetworks
        _, _, qid = send_one(c, "bob@example.test")
    assert server.queue_show(qid)[0]["client_ip"] == "127.0.0.1"


def test_header_and_smtp_in_one_packet(server):
    """Bytes after the header belong to the SMTP conversation."""
    c = RawSMTP(server.port())
    try:
        c.send(v1("203.0.113.9") + b"EHLO x.example.org\r\nNOOP\r\n")
        assert c.reply()[0] == 220
        code, lines = c.reply()
        assert code == 250 and "[203.0.113.9]" in lines[0], (code, lines)
        assert c.reply()[0] == 250
    finally:
        c.close()


def test_missing_header_closes_without_reply(server):
    with RawSMTP(server.port(), timeout=5) as c:
        c.send(b"EHLO not-a-proxy.example.org\r\n")
        assert c.is_closed(timeout=5), "connection without PROXY header not closed"


def test_per_ip_limit_uses_proxied_address(server):
    held = [connect(server, v1("192.0.2.50", 40000 + i)) for i in range(2)]
    try:
        with RawSMTP(server.port()) as c:
            c.send(v1("192.0.2.50", 40010))
            code, lines = c.reply()
            assert code == 421 and lines[0].startswith("4.7.0"), (code, lines)
        # other proxied clients (same socket peer 127.0.0.1) are not affected
        with connect(server, v1("192.0.2.51")) as c:
            c.cmd("QUIT")
    finally:
        for h in held:
            h.close()
