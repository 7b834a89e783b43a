"""Fairness between requesters, against a real daemon on the tiny model: per-requester
queue and token quotas, the priority cap, the num_predict cap, and deadlines that cut a
running request short."""

from __future__ import annotations

import signal
import time

from helpers import WAIT, DaemonProcess, Gate, daemon_config, read_finals, wait_for

from edged.serve.client import SocketClient

# Greedy, so a run is the same every time; the tiny model's 256-token context bounds -1.
LONG = {"prompt": "hello there", "options": {"num_predict": -1, "temperature": 0}}
GEN = {"prompt": "hello there", "options": {"num_predict": 8, "temperature": 0}}


def mqtt_ready(d):
    t = next(t for t in d.server.transports if t.name == "mqtt")
    wait_for(lambda: t.connected.is_set(), what="daemon connected to the broker")


def first_tokens(d) -> list:
    """Request ids in the order their first token was made."""
    order: list = []
    d.server.scheduler.token_hooks.append(lambda job, n: n == 1 and order.append(job.rid))
    return order


def test_a_flooding_device_cannot_take_the_queue_from_another(start_daemon, broker, device_factory):
    # Defaults: 16 queue slots, at most 4 requests per requester, priority capped at 0.
    d = start_daemon(broker=broker, batch_size=1)
    order = first_tokens(d)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    mqtt_ready(d)
    flooder, other = device_factory().connect(), device_factory().connect()
    for i in range(16):
        flooder.request({**LONG, "priority": 100}, corr=f"a{i}".encode())
    finals = flooder.wait_finals(12)
    assert gate.reached.wait(WAIT)
    assert len(finals) == 12
    assert all(f["error"]["code"] == "busy" and f["error"]["retry_after_ms"] > 0 for _, f in finals)
    accepted = sorted({f"a{i}" for i in range(16)} - {c.decode() for c, _ in finals})
    assert len(accepted) == 4  # one running (held at its first token) and three queued

    other.request(GEN, corr=b"b0")
    wait_for(lambda: d.server.scheduler.depth == 4, what="the other device's request queued")
    assert other.finals() == []  # not refused
    gate.release.set()
    [(corr, mine)] = other.wait_finals(1)
    assert corr == b"b0" and isinstance(mine["response"], str) and "error" not in mine
    done = dict(flooder.wait_finals(16))
    assert all("response" in done[a.encode()] for a in accepted)
    # Its priority 100 was lowered to 0, and among equals the requester with nothing
    # running goes first: the other device's request runs next, not after the flood.
    assert order[1] == "b0" and sorted(order[:1] + order[2:]) == accepted


def test_a_device_identity_is_one_requester_whatever_its_reply_topics(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker, limits={"max_queued_per_requester": 2})
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    mqtt_ready(d)
    # Two reply topics, one device identity (the <device> level of the request topic).
    a, b = device_factory().connect(), device_factory().connect()
    topic = "edged/testnode/request/sensor7"
    a.request(LONG, corr=b"1", topic=topic)
    assert gate.reached.wait(WAIT)
    b.request(LONG, corr=b"2", topic=topic)
    wait_for(lambda: d.server.scheduler.depth == 1, what="second request queued")
    a.request(LONG, corr=b"3", topic=topic)
    [(corr, busy)] = a.wait_finals(1)
    assert corr == b"3" and busy["error"]["code"] == "busy"
    # Another identity is not affected.
    b.request(GEN, corr=b"4", topic="edged/testnode/request/sensor8")
    wait_for(lambda: d.server.scheduler.depth == 2, what="the other identity's request queued")
    gate.release.set()
    assert {c for c, f in b.wait_finals(2) if "response" in f} == {b"2", b"4"}


def test_priority_above_the_cap_is_lowered_not_refused(start_daemon):
    def run(d) -> list:
        order = first_tokens(d)
        gate = Gate(at=1)
        d.server.scheduler.token_hooks.append(gate)
        with d.client() as c:
            c.send({"id": "first", **GEN})
            assert gate.reached.wait(WAIT)
            c.send({"id": "low", **GEN, "priority": -5})
            c.send({"id": "mid", **GEN})
            c.send({"id": "high", **GEN, "priority": 100})
            wait_for(lambda: d.server.scheduler.depth == 3, what="3 queued")
            gate.release.set()
            finals = read_finals(c, 4)
        assert all("response" in f for f in finals.values())
        d.stop()  # the next daemon takes the same socket path
        return order

    # Default max_priority 0: 100 counts as 0, so "high" waits behind the earlier "mid";
    # a lower priority is the sender's own choice and stays.
    assert run(start_daemon()) == ["first", "mid", "high", "low"]
    # With max_priority 10 it still jumps the queue, as 10.
    assert run(start_daemon(limits={"max_priority": 10})) == ["first", "high", "mid", "low"]


def test_num_predict_is_capped_and_minus_one_too(start_daemon):
    d = start_daemon(limits={"max_num_predict": 5})
    with d.client() as c:
        big = c.call({"id": "big", **GEN, "options": {"num_predict": 100, "temperature": 0}})
        whole = c.call({"id": "whole", **LONG})
        small = c.call({"id": "small", **GEN, "options": {"num_predict": 3, "temperature": 0}})
    assert big["done_reason"] == "length" and big["eval_count"] == 5
    assert whole["done_reason"] == "length" and whole["eval_count"] == 5
    assert small["done_reason"] == "length" and small["eval_count"] == 3


def test_deadline_passing_mid_generation_ends_with_partial_text(start_daemon):
    d = start_daemon()
    gate = Gate(at=3)
    d.server.scheduler.token_hooks.append(gate)
    timeout_ms = 3000
    with d.client() as c:
        sent = time.monotonic()
        c.send({"id": "d", **LONG, "options": {"num_predict": 200, "temperature": 0}, "timeout_ms": timeout_ms})
        assert gate.reached.wait(WAIT)  # running, three tokens out
        time.sleep(max(0.0, sent + timeout_ms / 1000 + 0.05 - time.monotonic()))
        gate.release.set()
        frames = []
        while not (frames and frames[-1].get("done")):
            frames.append(c.read())
    final = frames[-1]
    assert "error" not in final
    assert final["done_reason"] == "deadline"
    assert 3 <= final["eval_count"] < 200
    assert final["response"] and final["response"] == "".join(f["delta"] for f in frames[:-1])
    with d.client() as c:  # the daemon carries on
        assert c.call({"id": "next", **GEN})["done_reason"] in ("stop", "length")


def test_tokens_per_minute_refuses_with_a_retry_from_the_window(start_daemon):
    d = start_daemon(limits={"tokens_per_minute": 20})
    with d.client() as c, d.client() as other:
        t0 = time.monotonic()
        first = c.call({"id": 1, **GEN})
        second = c.call({"id": 2, **GEN})
        assert first["eval_count"] == 8 and second["eval_count"] == 8  # 16 of 20 spent
        busy = c.call({"id": 3, **GEN})  # may make 8 more: over the budget
        bound = (60 - (time.monotonic() - t0)) * 1000
        assert busy["error"]["code"] == "busy"
        # The first 8 tokens leave the rolling minute no sooner than a minute after t0.
        assert bound - 1 <= busy["error"]["retry_after_ms"] <= 60_000
        fits = c.call({"id": 4, **GEN, "options": {"num_predict": 4, "temperature": 0}})
        assert fits["eval_count"] == 4  # exactly what was left
        assert c.call({"id": 5, **GEN, "options": {"num_predict": 1}})["error"]["code"] == "busy"
        assert other.call({"id": 1, **GEN})["eval_count"] == 8  # another requester has its own budget


def test_sighup_applies_new_limits_to_a_running_daemon(tmp_path, tiny_store):
    cfg = daemon_config(tmp_path, tiny_store.root, limits={"max_num_predict": 5})
    path = cfg["socket"]["path"]
    ask = {**GEN, "options": {"num_predict": 100, "temperature": 0}}
    with DaemonProcess(tmp_path, cfg).wait_ready(path) as p:
        with SocketClient(path, timeout=WAIT) as c:
            assert c.call(ask)["eval_count"] == 5
        cfg["limits"]["max_num_predict"] = 7
        p.write_config(cfg)
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "limits.max_num_predict" in p.logtext(), what="the reload to be logged")
        with SocketClient(path, timeout=WAIT) as c:
            assert c.call(ask)["eval_count"] == 7
        assert "need a restart" not in p.logtext()
