"""The DNS-based client checks `dnsbl`, `dnswl`, `iprev` and `helo` through the real `mailroom serve`
and a real DNS server (dnsmasq) on loopback. Listeners take the PROXY protocol, so each test
chooses its client address from the documentation ranges (192.0.2.0/24), which the plugins treat
as public. The zones:

- bl.test lists 192.0.2.99 (127.0.0.2, with a TXT reason), 192.0.2.98 (127.0.0.4), 192.0.2.97
  (127.255.255.254, a list error code), 192.0.2.50 and 192.0.2.60;
- bl2.test lists 192.0.2.50 and 192.0.2.51;
- wl.test lists 192.0.2.60;
- reverse DNS: 192.0.2.7 <-> host.example.test (verifies), 192.0.2.8 -> fake.example.test (no
  address: iprev fail), 192.0.2.9 has no PTR (iprev permerror).
"""

import time

import pytest

from conftest import Dnsmasq, RawSMTP, free_port, header_fields, parse_queued_id, split_received

REASON = "Listed for spam: see https://bl.test/q?192.0.2.99"


def listed(zone: str, ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + "." + zone


@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    d = Dnsmasq(
        tmp_path_factory.mktemp("dns"),
        hosts={
            listed("bl.test", "192.0.2.99"): "127.0.0.2",
            listed("bl.test", "192.0.2.98"): "127.0.0.4",
            listed("bl.test", "192.0.2.97"): "127.255.255.254",
            listed("bl.test", "192.0.2.50"): "127.0.0.2",
            listed("bl2.test", "192.0.2.50"): "127.0.0.2",
            listed("bl2.test", "192.0.2.51"): "127.0.0.2",
            listed("bl.test", "192.0.2.60"): "127.0.0.2",
            listed("wl.test", "192.0.2.60"): "127.0.10.2",
            # Also its PTR record: 192.0.2.7 verifies.
            "host.example.test": "192.0.2.7",
        },
        txt={listed("bl.test", "192.0.2.99"): REASON},
        ptr={"192.0.2.8": "fake.example.test"},
    )
    d.start()
    yield d
    d.stop()


def listener(name: str, nameserver: str, *plugins: dict) -> dict:
    return {"name": name, "proxyProtocol": True, "dns": {"nameservers": [nameserver], "timeout": "2s"},
            "plugins": list(plugins)}


@pytest.fixture(scope="module")
def server(module_factory, dns):
    ns = dns.nameserver
    return module_factory.make(listeners=[
        listener("bl", ns, {"dnswl": {"zones": [{"name": "wl.test"}]}},
                 {"dnsbl": {"zones": [{"name": "bl.test"}]}}),
        listener("codes", ns, {"dnsbl": {"zones": [{"name": "bl.test", "returnCodes": ["127.0.0.2"]}]}}),
        listener("weights", ns, {"dnsbl": {"zones": [{"name": "bl.test"}, {"name": "bl2.test"}],
                                           "threshold": 2, "rejectAt": "connect"}}),
        listener("tag", ns, {"dnsbl": {"zones": [{"name": "bl.test", "weight": 2}], "action": "tag"}}),
        listener("iprev", ns, {"iprev": {}}),
        listener("iprev-reject", ns, {"iprev": {"onFail": "reject"}}),
        listener("helo", ns, {"iprev": {}}, {"helo": {}}),
        listener("helo-ptr", ns, {"helo": {"matchesRdns": "reject", "resolves": "tag"}}),
    ])


def connect(server, name: str, ip: str) -> tuple[RawSMTP, int, list[str]]:
    c = RawSMTP(server.port(name))
    c.send(f"PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n")
    code, lines = c.banner()
    return c, code, lines


def session(server, name: str, ip: str) -> RawSMTP:
    c, code, lines = connect(server, name, ip)
    assert code == 220, (name, ip, code, lines)
    return c


def rcpt(c: RawSMTP, to: str = "bob@example.test", helo: str = "client.example.org") -> tuple[int, list[str]]:
    c.ehlo(helo)
    code, lines = c.cmd("MAIL FROM:<alice@client.example.org>")
    assert code == 250, (code, lines)
    return c.cmd(f"RCPT TO:<{to}>")


def finish(c: RawSMTP, extra: str = "") -> str:
    """DATA after an accepted RCPT (`extra`: more header lines): the queue id."""
    code, lines = c.cmd("DATA")
    assert code == 354, (code, lines)
    c.send(f"{extra}Subject: dns test\r\nMessage-ID: <{time.time_ns()}@client.example.org>\r\n\r\nhi\r\n.\r\n")
    code, lines = c.reply()
    assert code == 250, (code, lines)
    return parse_queued_id(lines[0])


def send(server, name: str, ip: str, helo: str = "client.example.org", extra: str = "") -> str:
    with session(server, name, ip) as c:
        code, lines = rcpt(c, helo=helo)
        assert code == 250, (code, lines)
        return finish(c, extra)


def stored_headers(server, qid: str) -> dict[str, str]:
    _, stored = server.queue_show(qid)
    _, rest = split_received(stored)
    return dict(header_fields(rest))


# --- dnsbl / dnswl ----------------------------------------------------------------------------


def test_listed_client_is_refused_at_rcpt_with_the_zone_reason(server):
    with session(server, "bl", "192.0.2.99") as c:
        code, lines = rcpt(c)
        assert code == 550 and lines[0].startswith("5.7.1 Client 192.0.2.99 listed by bl.test: "), (code, lines)
        assert REASON in lines[0], lines  # the zone's TXT record
        # RFC 5321 §4.5.1: the bare postmaster still takes mail from a listed client.
        code, lines = c.cmd("RCPT TO:<postmaster>")
        assert code == 250, (code, lines)
    assert server.metric("mailroom_plugin_dnsbl_checks_total", listener="bl", outcome="listed") >= 1
    assert server.metric("mailroom_plugin_dnsbl_refusals_total", listener="bl", outcome="reject") >= 1


def test_clean_client_and_list_error_codes_pass(server):
    # Fields that claim our verdicts are removed: only ours can be trusted downstream.
    forged = "X-Mailroom-DNSWL: wl.test\r\nX-Mailroom-DNSBL: none\r\n"
    headers = stored_headers(server, send(server, "bl", "192.0.2.10", extra=forged))
    assert "X-Mailroom-DNSBL" not in headers and "X-Mailroom-DNSWL" not in headers, headers
    # 127.255.255.254 is the list refusing the query, not a listing: onError accept lets it in.
    send(server, "bl", "192.0.2.97")
    assert server.metric("mailroom_plugin_dnsbl_checks_total", listener="bl", outcome="error") >= 1


def test_dnswl_listed_client_skips_the_dnsbl(server):
    headers = stored_headers(server, send(server, "bl", "192.0.2.60"))
    assert headers.get("X-Mailroom-DNSWL") == "wl.test", headers
    assert server.metric("mailroom_plugin_dnswl_checks_total", listener="bl", outcome="listed") >= 1
    assert server.metric("mailroom_plugin_dnsbl_checks_total", listener="bl", outcome="skipped") >= 1


def test_return_codes_choose_which_answers_count(server):
    send(server, "codes", "192.0.2.98")  # answers 127.0.0.4: not one of the codes
    with session(server, "codes", "192.0.2.99") as c:
        code, lines = rcpt(c)
        assert code == 550 and "listed by bl.test" in lines[0], (code, lines)


def test_weights_add_up_to_the_threshold_and_connect_is_refused(server):
    c, code, lines = connect(server, "weights", "192.0.2.50")  # bl.test + bl2.test = 2
    with c:
        assert code == 554 and lines[0].startswith("5.7.1 Client 192.0.2.50 listed by bl.test; bl2.test"), \
            (code, lines)
    send(server, "weights", "192.0.2.51")  # bl2.test only: 1 < 2
    send(server, "weights", "192.0.2.99")  # bl.test only


def test_tag_mode_accepts_and_adds_the_header(server):
    headers = stored_headers(server, send(server, "tag", "192.0.2.99"))
    assert headers.get("X-Mailroom-DNSBL") == "bl.test (weight 2)", headers


def test_dns_server_down_fails_open_or_closed(module_factory):
    dead = f"127.0.0.1:{free_port()}"
    down = module_factory.make(listeners=[
        listener("open", dead, {"dnsbl": {"zones": [{"name": "bl.test"}], "timeout": "1s"}}),
        listener("closed", dead, {"dnsbl": {"zones": [{"name": "bl.test"}], "timeout": "1s",
                                            "onError": "tempfail"}}),
        listener("iprev-closed", dead, {"iprev": {"onTempError": "tempfail", "timeout": "1s"}}),
    ])
    send(down, "open", "192.0.2.99")
    with session(down, "closed", "192.0.2.99") as c:
        code, lines = rcpt(c)
        assert code == 451 and lines[0].startswith("4.7.1"), (code, lines)
    c, code, lines = connect(down, "iprev-closed", "192.0.2.7")
    with c:
        assert code == 421 and lines[0].startswith("4.7.25"), (code, lines)
        assert c.is_closed(), "421 closes the connection"
    assert down.metric("mailroom_plugin_dnsbl_checks_total", listener="closed", outcome="error") >= 1


# --- iprev ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ip, result", [
    ("192.0.2.7", "iprev=pass policy.iprev=192.0.2.7 (host.example.test)"),
    ("192.0.2.8", "iprev=fail policy.iprev=192.0.2.8"),
    ("192.0.2.9", "iprev=permerror policy.iprev=192.0.2.9"),
])
def test_iprev_result_is_in_authentication_results(server, ip, result):
    headers = stored_headers(server, send(server, "iprev", ip))
    assert headers.get("Authentication-Results") == f"mail.example.test; {result}", headers


def test_iprev_reject_refuses_unverified_clients_at_connect(server):
    for ip in ("192.0.2.8", "192.0.2.9"):
        c, code, lines = connect(server, "iprev-reject", ip)
        with c:
            assert code == 554 and lines[0] == f"5.7.25 Reverse DNS validation failed for {ip}", (code, lines)
    send(server, "iprev-reject", "192.0.2.7")
    assert server.metric("mailroom_plugin_iprev_checks_total", listener="iprev-reject", outcome="permerror") >= 1


# --- helo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, check", [
    ("localhost", "fqdn"),
    ("192.0.2.7", "fqdn"),
    ("mail.example.test", "ourName"),
    ("[192.0.2.200]", "literalMatchesClient"),
])
def test_bad_helo_is_refused_and_a_good_one_then_passes(server, name, check):
    with session(server, "helo", "192.0.2.7") as c:
        code, lines = c.cmd(f"EHLO {name}")
        assert code == 550 and lines[0].startswith(f"5.7.1 HELO/EHLO name rejected ({check})"), (code, lines)
        code, lines = c.cmd("MAIL FROM:<alice@client.example.org>")
        assert code == 503, (code, lines)  # no greeting was accepted
        code, lines = rcpt(c, helo="[192.0.2.7]")
        assert code == 250, (code, lines)
    assert server.metric("mailroom_plugin_helo_failures_total", listener="helo", check=check) >= 1


def test_helo_matching_the_verified_rdns_is_not_tagged(server):
    headers = stored_headers(server, send(server, "helo", "192.0.2.7", helo="host.example.test",
                                          extra="X-Mailroom-HELO: forged\r\n"))
    assert "X-Mailroom-HELO" not in headers, headers


def test_helo_not_matching_the_rdns_is_tagged(server):
    headers = stored_headers(server, send(server, "helo", "192.0.2.7", helo="other.client.test"))
    assert headers.get("X-Mailroom-HELO") == "failed matchesRdns", headers
    # A client without verified reverse DNS matches no name.
    headers = stored_headers(server, send(server, "helo", "192.0.2.9", helo="host.example.test"))
    assert headers.get("X-Mailroom-HELO") == "failed matchesRdns", headers


def test_helo_without_iprev_looks_up_the_ptr_itself(server):
    with session(server, "helo-ptr", "192.0.2.7") as c:
        code, lines = c.cmd("EHLO elsewhere.client.test")
        assert code == 550 and "(matchesRdns)" in lines[0], (code, lines)
        code, lines = rcpt(c, helo="host.example.test")  # resolves: tag passes (it has an A record)
        assert code == 250, (code, lines)
        qid = finish(c)
    assert "X-Mailroom-HELO" not in stored_headers(server, qid)
    # An under-domain of the PTR name matches; it has no address, which `resolves` tags.
    headers = stored_headers(server, send(server, "helo-ptr", "192.0.2.7", helo="mx.host.example.test"))
    assert headers.get("X-Mailroom-HELO") == "failed resolves", headers
