"""An acknowledged MQTT request is never lost and never answered twice: the daemon is
SIGKILLed (as the OOM killer, systemd's watchdog or a pulled plug would end it) while
requests are queued and running, then started again, with and without a broker restart
in between. Real `edged serve` processes, a real mosquitto with persistence."""

from __future__ import annotations

import collections
import json
import signal
import time

import pytest
from helpers import WAIT, DaemonProcess, Device, daemon_config, wait_for

from edged.serve.client import SocketClient

N = 8


def _devices(broker, n):
    # Persistent sessions: replies published while a device is away wait at the broker.
    return [Device(broker, client_id=f"dur-{i}", clean=False).connect() for i in range(n)]


def _final_counts(devices) -> dict:
    counts = collections.Counter()
    for d in devices:
        for corr, _ in d.finals():
            counts[corr] += 1
    return counts


def _assert_none_ran_twice(devices) -> int:
    """Every final of a request is the same bytes: at most a re-send of the stored answer
    (QoS 1 is at least once: a kill between the broker's PUBACK and the daemon's record of
    it sends the answer again), never a second run. Returns how many re-sends there were."""
    resent = 0
    for d in devices:
        finals = collections.defaultdict(set)
        for topic, payload in d.raw:
            frame = json.loads(payload)
            if isinstance(frame, dict) and frame.get("done"):
                finals[frame.get("id")].add(payload)
                resent += 1
        assert all(len(v) == 1 for v in finals.values()), finals
        resent -= len(finals)
    return resent


@pytest.mark.parametrize("restart_broker", [False, True], ids=["daemon-killed", "daemon-killed-broker-restarted"])
def test_sigkill_with_requests_queued_and_running_then_restart_answers_each_once(tmp_path, tiny_store, broker, restart_broker):
    cfg = daemon_config(tmp_path, tiny_store.root, broker=broker, batch_size=2)
    first = DaemonProcess(tmp_path, cfg).wait_ready()
    wait_for(lambda: "MQTT: connected" in first.logtext(), what="the daemon's MQTT connection")
    devices = _devices(broker, N)
    for i, dev in enumerate(devices):
        # streamed, so "the first one streams" is visible; long enough that most are still queued
        dev.request({"id": f"r{i}", "prompt": f"count to {i}", "stream": True, "options": {"num_predict": 400}},
                    corr=f"r{i}".encode())
    wait_for(lambda: any("delta" in f for d in devices for _, f in d.frames), what="the first delta")
    first.proc.kill()
    first.proc.wait(WAIT)
    answered_before = sum(_final_counts(devices).values())
    assert answered_before < N, "the kill came too late to test anything"
    if restart_broker:
        broker.restart()
        wait_for(lambda: all(d.c.is_connected() for d in devices), what="devices to reconnect")

    second = DaemonProcess(tmp_path, cfg)
    try:
        second.wait_ready()
        wait_for(lambda: len(_final_counts(devices)) == N, what="every request answered")
        time.sleep(1.0)  # a duplicate would arrive now
        counts = _final_counts(devices)
        assert sorted(counts) == sorted(f"r{i}".encode() for i in range(N))  # none lost
        resent = _assert_none_ran_twice(devices)
        for d in devices:
            for _, f in d.finals():
                assert "response" in f and f["done_reason"] in ("stop", "length"), f
        assert "acknowledged request(s) were not answered by the last run" in second.logtext()
        print(f"\nSIGKILL{' + broker restart' if restart_broker else ''}: {answered_before} answered before the kill, "
              f"{N - answered_before} replayed after it; lost 0, run twice 0, answers re-sent {resent}")
    finally:
        second.stop()
        for d in devices:
            d.close()


def test_answer_made_while_the_broker_was_away_survives_a_kill(tmp_path, tiny_store, broker):
    """The answer is in paho's queue, not at the broker, when the daemon is killed: the next
    run sends it (it is not lost, and the prompt does not run again)."""
    cfg = daemon_config(tmp_path, tiny_store.root, broker=broker)
    dev = Device(broker, client_id="away-0", clean=False).connect()
    with DaemonProcess(tmp_path, cfg) as first:  # killed on the way out, whatever happens
        first.wait_ready()
        wait_for(lambda: "MQTT: connected" in first.logtext(), what="the daemon's MQTT connection")
        dev.request({"id": "q", "prompt": "count", "stream": True, "options": {"num_predict": 200}}, corr=b"q")
        wait_for(lambda: any("delta" in f for _, f in dev.frames), what="the first delta")
        first.proc.send_signal(signal.SIGSTOP)  # so the answer cannot be done before the broker is gone
        broker.stop()
        first.proc.send_signal(signal.SIGCONT)
        with SocketClient(cfg["socket"]["path"], timeout=30) as c:
            wait_for(lambda: c.call({"op": "status"})["status"]["in_flight"] == 0, what="the answer to be made")
        first.proc.kill()
        first.proc.wait(WAIT)
    assert dev.finals() == []
    broker.start()
    second = DaemonProcess(tmp_path, cfg)
    try:
        second.wait_ready()
        (corr, final), = dev.wait_finals(1)
        assert corr == b"q" and final["done_reason"] in ("stop", "length") and final["eval_count"] > 0
        time.sleep(1.0)  # a second copy would arrive now
        assert len(dev.finals()) == 1
        log = second.logtext()
        assert "1 answer(s) of the last run never reached the broker" in log
        assert "not answered by the last run" not in log  # not run again
    finally:
        second.stop()
        dev.close()


def test_unsent_answer_to_a_topic_the_policy_no_longer_allows_is_dropped(tmp_path, tiny_store, broker):
    """A journal row is data from disk too: its reply topic is checked again before a re-send
    (here one the reply policy refuses, as after the policy was narrowed), and it is never
    published there; a good unsent answer beside it still goes out."""
    from edged.transports.journal import Journal

    cfg = daemon_config(tmp_path, tiny_store.root, broker=broker)
    dev = Device(broker, client_id="unsent-0", clean=False).connect()
    spy = Device(broker).connect("#")
    j = Journal(cfg["mqtt"]["journal"])
    for rid, topic in (("bad", "home/door/set"), ("good", dev.reply_topic)):
        key, _, _ = j.begin(f"mqtt:|{topic}", rid, "edged/testnode/request", b"{}",
                            {"response_topic": topic, "correlation_data": rid.encode().hex(), "expiry_at": None})
        frame = json.dumps({"id": rid, "done": True, "response": "stored"}).encode()
        j.finish(key, frame, outbox=frame)
    j.close()
    with DaemonProcess(tmp_path, cfg) as d:
        d.wait_ready()
        (corr, final), = dev.wait_finals(1)
        assert corr == b"good" and final["response"] == "stored"
        time.sleep(1.0)
        assert "its reply topic is no longer allowed" in d.logtext()
        assert not [t for t, _ in spy.raw if t == "home/door/set"]
        d.stop()
    j = Journal(cfg["mqtt"]["journal"])
    assert j.unsent() == []  # neither is tried again at the next start
    j.close()
    dev.close()
    spy.close()


def test_redelivery_memory_survives_a_restart(tmp_path, tiny_store, broker):
    """A device that sends the same request again after the daemon restarted gets the stored
    answer, not a second run."""
    cfg = daemon_config(tmp_path, tiny_store.root, broker=broker)
    dev = Device(broker).connect()
    req = {"id": "same", "prompt": "hi", "options": {"num_predict": 4, "seed": 1}}
    with DaemonProcess(tmp_path, cfg) as d:
        d.wait_ready()
        wait_for(lambda: "MQTT: connected" in d.logtext(), what="MQTT connection")
        dev.request(req, corr=b"same")
        (_, first), = dev.wait_finals(1)
        d.stop()
    with DaemonProcess(tmp_path, cfg) as d:
        d.wait_ready()
        wait_for(lambda: "MQTT: connected" in d.logtext(), what="MQTT connection")
        dev.request(req, corr=b"same")
        (_, a), (_, b) = dev.wait_finals(2)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # the stored frame, byte for byte
        assert "re-sending its result" in d.logtext()
        d.stop()
    dev.close()
