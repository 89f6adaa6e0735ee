"""Durability: a message answered with 250 survives a SIGKILL right after the reply."""

import os
import random
import signal
import threading
import time

from conftest import RawSMTP, parse_queued_id, split_received


def make_message(tag: str, rng: random.Random) -> bytes:
    lines = [f"Subject: crash test {tag}".encode(), f"X-Tag: {tag}".encode(), b""]
    for _ in range(rng.randint(1, 40)):
        n = rng.randint(0, 200)
        line = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 .-") for _ in range(n))
        lines.append(line)
    return b"\r\n".join(lines) + b"\r\n"


def dot_stuff(msg: bytes) -> bytes:
    out = msg.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out


def send_raw(c: RawSMTP, msg: bytes, rcpt="bob@example.test") -> str:
    """One pipelined transaction; returns the queue id of the 250."""
    c.send(f"MAIL FROM:<crash@client.example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    assert c.reply()[0] == 250
    assert c.reply()[0] == 250
    assert c.reply()[0] == 354
    c.send(dot_stuff(msg) + b".\r\n")
    code, lines = c.reply()
    assert code == 250, (code, lines)
    return parse_queued_id(lines[0])


def check_all_present(server, acked: dict):
    listed = {e["id"] for e in server.queue_list()}
    missing = [q for q in acked if q not in listed]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost after SIGKILL: {missing}"
    for qid, msg in acked.items():
        env, stored = server.queue_show(qid)
        assert env["id"] == qid
        assert split_received(stored)[1] == msg, qid
    corrupt = server.spool / "corrupt"
    assert not corrupt.exists() or not any(corrupt.iterdir()), list(corrupt.iterdir())


def test_sigkill_right_after_250(mailroom_factory):
    seed = int(os.environ.get("MAILROOM_CRASH_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    server = mailroom_factory.make()
    acked: dict[str, bytes] = {}
    total, rounds = 20, 0
    while len(acked) < total and rounds < 10:
        rounds += 1
        k = min(rng.randint(1, 6), total - len(acked))
        c = RawSMTP(server.port())
        c.banner()
        c.ehlo()
        for i in range(k):
            msg = make_message(f"seed{seed}-r{rounds}-m{i}", rng)
            qid = send_raw(c, msg)
            acked[qid] = msg
        # the 250 of the last message has just been read: kill at once
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        c.close()
        server.start()
        check_all_present(server, acked)
    assert len(acked) == total, f"seed {seed}"
    assert server.queue_stats()["messages"] == total


def test_sigkill_under_concurrent_load(mailroom_factory):
    """Several clients keep sending; the server is killed at an arbitrary moment. Every message
    that got its 250 must be in the spool after a restart (others may or may not be)."""
    server = mailroom_factory.make()
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    rng_seed = time.time_ns() % 100000

    def sender(n: int):
        rng = random.Random(rng_seed + n)
        try:
            c = RawSMTP(server.port(), timeout=10)
            c.banner()
            c.ehlo()
            i = 0
            while not stop.is_set() and i < 200:
                msg = make_message(f"t{n}-m{i}", rng)
                qid = send_raw(c, msg)
                with lock:
                    acked[qid] = msg
                i += 1
        except (OSError, EOFError, AssertionError):
            pass  # the server died under us

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    target = random.Random(rng_seed).randint(10, 40)
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= target:
                break
        time.sleep(0.005)
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    with lock:
        acked = dict(acked)
    assert len(acked) >= target, f"only {len(acked)} messages acknowledged before the deadline"
    server.start()
    check_all_present(server, acked)
    # at most one unacknowledged (in flight) message per client may have made it
    n = server.queue_stats()["messages"]
    assert len(acked) <= n <= len(acked) + len(threads), (n, len(acked))
