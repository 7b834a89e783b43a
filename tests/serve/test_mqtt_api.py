"""MQTT 5 request/response against a real mosquitto, with paho devices."""

from __future__ import annotations

import json
import threading
import time

from helpers import WAIT, Device, Gate, wait_for

GEN = {"prompt": "hello there", "options": {"num_predict": 6, "temperature": 0}}


def mqtt_ready(d):
    t = next(t for t in d.server.transports if t.name == "mqtt")
    wait_for(lambda: t.connected.is_set(), what="daemon connected to the broker")
    return t


def test_v5_request_response_one_message_with_correlation(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request(GEN, corr=b"corr-1")
    [(corr, f)] = dev.wait_finals(1)
    assert corr == b"corr-1"
    assert f["done"] is True and f["id"] == "corr-1" and isinstance(f["response"], str)
    assert "eval_count" in f and "total_duration" in f
    time.sleep(0.05)
    assert len(dev.frames) == 1  # one message: the whole completion and its stats


def test_v5_stream_true_sends_deltas_then_final(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request({**GEN, "id": "s1", "stream": True}, corr=b"x")
    dev.wait_finals(1)
    frames = [f for _, f in dev.frames]
    assert frames[-1]["done"] and all("delta" in f for f in frames[:-1])
    assert "".join(f["delta"] for f in frames[:-1]) == frames[-1]["response"]
    assert all(c == b"x" for c, _ in dev.frames)


def test_mqtt311_fallback_reply_to_and_id_in_payload(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory(v5=False).connect()
    dev.request({**GEN, "id": "old-1", "reply_to": dev.reply_topic})
    [(corr, f)] = dev.wait_finals(1)
    assert corr is None and f["id"] == "old-1" and "response" in f


def test_twenty_concurrent_requesters_all_matched_none_duplicated(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker, queue_size=200)
    mqtt_ready(d)
    devices = [device_factory().connect() for _ in range(20)]
    per = 4

    def fire(dev, k):
        for j in range(per):
            dev.request({"prompt": f"q{k}-{j}", "stream": j % 2 == 1, "options": {"num_predict": 3}}, corr=f"{k}-{j}".encode())

    threads = [threading.Thread(target=fire, args=(dev, k)) for k, dev in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for dev in devices:
        dev.wait_finals(per)
    time.sleep(0.1)  # a moment for any duplicate to show up
    for k, dev in enumerate(devices):
        finals = dev.finals()
        corrs = sorted(c for c, _ in dev.finals())
        assert corrs == sorted(f"{k}-{j}".encode() for j in range(per)), corrs
        assert all("response" in f and f["id"] == c.decode() for c, f in finals)
    assert d.server.scheduler.completed == 20 * per


MALFORMED_MQTT = [
    b"", b"not json", b"{", b"[]", b"42", b"null", b'"str"', b"\x00\x01\x02", b"\xff\xfe", b"{'a': 1}",
    b'{"prompt": 1}', b'{"prompt": null}', b'{"prompt": []}', b'{"prompt": {}}', b'{"prompt": false}',
    b"{}", b'{"id": "x"}', b'{"op": 1}', b'{"op": "explode"}', b'{"op": "chat"}', b'{"op": "chat", "messages": {}}',
    b'{"op": "chat", "messages": [{"role": "user"}]}', b'{"op": "chat", "messages": [{"role": "x", "content": "y"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}', b'{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
    b'{"prompt": "x", "options": "fast"}', b'{"prompt": "x", "options": {"temperature": "warm"}}',
    b'{"prompt": "x", "options": {"top_k": -1}}', b'{"prompt": "x", "options": {"top_p": 7}}',
    b'{"prompt": "x", "options": {"num_predict": -7}}', b'{"prompt": "x", "options": {"nonsense": true}}',
    b'{"prompt": "x", "options": {"stop": [1]}}', b'{"prompt": "x", "options": {"repeat_penalty": -2}}',
    b'{"prompt": "x", "options": {"min_p": "a"}}', b'{"prompt": "x", "options": {"num_ctx": -1}}',
    b'{"prompt": "x", "stream": 1}', b'{"prompt": "x", "raw": "no"}', b'{"prompt": "x", "system": []}',
    b'{"prompt": "x", "priority": 1.5}', b'{"prompt": "x", "timeout_ms": 0}', b'{"prompt": "x", "id": []}',
    b'{"prompt": "x", "id": false}', b'{"prompt": "x", "model": 1}', b'{"prompt": "x", "model": "other"}',
    b'{"prompt": "x", "extra": 1}', b'{"prompt": "x", "format": "xml"}', b'{"prompt": "x", "reply_to": "a/#"}',
    b'{"prompt": "x", "reply_to": 5}', b'{"op": "cancel", "target": {}}', b'{"prompt": "", "raw": true}',
    b'{"prompt": "' + b"w" * 40_000 + b'"}',  # over max_prompt_chars
    b'{"prompt": "' + b"v" * 263_000 + b'"}',  # over max_request_bytes, within the packet size we announce
]


def test_malformed_corpus_gets_error_replies_and_daemon_keeps_serving(start_daemon, broker, device_factory):
    assert len(MALFORMED_MQTT) >= 50
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory().connect()
    for i, payload in enumerate(MALFORMED_MQTT):
        dev.request(payload, corr=f"bad-{i}".encode())
    finals = dev.wait_finals(len(MALFORMED_MQTT))
    assert sorted(c for c, _ in finals) == sorted(f"bad-{i}".encode() for i in range(len(MALFORMED_MQTT)))
    for c, f in finals:
        assert f["error"]["code"] and f["error"]["message"], (c, f)
    codes = {f["error"]["code"] for _, f in finals}
    assert {"malformed_request", "invalid_request", "unknown_op", "payload_too_large", "model_not_found"} <= codes
    # Past the Maximum Packet Size announced in CONNECT the broker drops the publish: no reply
    # (documented), nothing reaches the daemon, and it keeps serving.
    dev.request(b'{"prompt": "' + b"v" * 5_000_000 + b'"}', corr=b"huge")
    dev.request(GEN, corr=b"good")
    finals = dev.wait_finals(len(MALFORMED_MQTT) + 1)
    assert "response" in dict((c, f) for c, f in finals)[b"good"]
    assert b"huge" not in dict(dev.finals())


def test_no_reply_address_goes_to_error_topic(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory().connect("edged/testnode/error")
    dev.request(b"garbage", response=False)
    dev.request({**GEN, "id": "lost"}, response=False)
    dev.wait_finals(2)
    topics = [t for t, _ in dev.raw]
    assert topics == ["edged/testnode/error", "edged/testnode/error"]
    codes = sorted(f["error"]["code"] for _, f in dev.finals())
    assert codes == ["invalid_request", "malformed_request"]


def test_availability_status_info_telemetry_and_last_will(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker, mqtt__telemetry_interval=0.05)
    mqtt_ready(d)
    dev = device_factory().connect("edged/testnode/status", "edged/testnode/info", "edged/testnode/telemetry")
    wait_for(lambda: {t for t, _ in dev.raw} >= {"edged/testnode/status", "edged/testnode/info", "edged/testnode/telemetry"},
             what="status, info and telemetry")  # fmt: skip
    msgs = {t: p for t, p in dev.raw}
    assert msgs["edged/testnode/status"] == b"online"
    info = json.loads(msgs["edged/testnode/info"])
    assert info["model"] == "tiny" and {"quantization", "context_length", "threads", "version"} <= set(info)
    tele = json.loads(msgs["edged/testnode/telemetry"])
    assert {"queue_depth", "tokens_per_second", "rss_bytes", "governor"} <= set(tele)
    d.stop()
    wait_for(lambda: dev.raw[-1] == ("edged/testnode/status", b"offline") or
             ("edged/testnode/status", b"offline") in dev.raw, what="offline")  # fmt: skip
    # retained: a device that connects later sees "offline"
    late = device_factory().connect("edged/testnode/status")
    wait_for(lambda: late.raw, what="retained status")
    assert late.raw[0] == ("edged/testnode/status", b"offline")


def test_last_will_when_daemon_dies(broker, device_factory, tmp_path, tiny_store):
    """A daemon process killed with SIGKILL: the broker publishes our will."""
    from helpers import DaemonProcess, daemon_config

    cfg = daemon_config(tmp_path, tiny_store.root, broker=broker, mqtt__keepalive=1)
    p = DaemonProcess(tmp_path, cfg).wait_ready()
    dev = device_factory().connect("edged/testnode/status")
    wait_for(lambda: ("edged/testnode/status", b"online") in dev.raw, what="online")
    p.kill()
    wait_for(lambda: ("edged/testnode/status", b"offline") in dev.raw, what="last will")


def test_cancel_topic_cancels_only_the_senders_own_requests(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    gate = Gate(at=2)
    d.server.scheduler.token_hooks.append(gate)
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request({"id": "long", "prompt": "x", "options": {"num_predict": 200}}, corr=b"L")
    assert gate.reached.wait(WAIT)
    dev.request({"id": "queued", **GEN}, corr=b"Q")
    wait_for(lambda: d.server.scheduler.depth == 1, what="queued")
    other = device_factory().connect()  # another reply topic: not the requester
    other.request({"id": "long"}, topic="edged/testnode/cancel", corr=b"X")
    assert other.wait_finals(1)[0][1]["cancelled"] is False
    dev.request({"id": "queued"}, topic="edged/testnode/cancel", corr=b"CQ")
    dev.request({"op": "cancel", "target": "long"}, corr=b"CL")  # in-band on the request topic works too
    finals = dict(dev.wait_finals(4))
    assert finals[b"CQ"]["cancelled"] is True and finals[b"CL"]["cancelled"] is True
    assert finals[b"Q"]["error"]["code"] == "cancelled"
    assert finals[b"L"]["done_reason"] == "cancel"


def test_message_expiry_is_the_deadline(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request({"id": "a", **GEN}, corr=b"a")
    assert gate.reached.wait(WAIT)
    dev.request({"id": "b", **GEN}, corr=b"b", expiry=1)
    wait_for(lambda: d.server.scheduler.depth == 1, what="queued")
    time.sleep(1.05)  # its 1 s Message Expiry passes while it waits
    gate.release.set()
    finals = dict(dev.wait_finals(2))
    assert "response" in finals[b"a"]
    assert finals[b"b"]["error"]["code"] == "deadline_exceeded"
    assert d.server.scheduler.completed == 1


def test_busy_reply_when_queue_full(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker, queue_size=1)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request(GEN, corr=b"1")
    assert gate.reached.wait(WAIT)
    dev.request(GEN, corr=b"2")
    dev.request(GEN, corr=b"3")
    [(c, busy)] = dev.wait_finals(1)
    assert c == b"3" and busy["error"]["code"] == "busy" and busy["error"]["retry_after_ms"] > 0
    gate.release.set()
    finals = dict(dev.wait_finals(3))
    assert "response" in finals[b"1"] and "response" in finals[b"2"]


def test_redelivered_request_id_never_runs_twice(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request({**GEN, "id": "once"}, corr=b"c")
    dev.wait_finals(1)
    dev.request({**GEN, "id": "once"}, corr=b"c")  # what a QoS 1 redelivery looks like to us
    finals = dev.wait_finals(2)
    assert finals[0][1]["response"] == finals[1][1]["response"]  # the stored result, re-sent
    assert d.server.scheduler.completed == 1


def test_broker_down_at_start_then_up(start_daemon, broker, device_factory):
    broker.stop()
    d = start_daemon(broker=broker)
    with d.client() as c:  # the socket serves while MQTT retries
        assert "response" in c.call(GEN)
    broker.start()
    mqtt_ready(d)
    dev = device_factory().connect()
    dev.request(GEN, corr=b"after")
    assert "response" in dev.wait_finals(1)[0][1]


def test_broker_restart_mid_stream_completes_the_stream(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    gate = Gate(at=3)
    d.server.scheduler.token_hooks.append(gate)
    t = mqtt_ready(d)
    dev = device_factory(clean=False, client_id="dev-persistent")
    dev.c.reconnect_delay_set(1, 1)
    dev.connect()
    dev.request({"id": "s", "prompt": "tell", "stream": True, "options": {"num_predict": 30, "temperature": 0}}, corr=b"s")
    assert gate.reached.wait(WAIT)
    wait_for(lambda: len(dev.frames) >= 2, what="first deltas")
    broker.stop()  # SIGTERM: mosquitto saves sessions and queued messages
    wait_for(lambda: not t.connected.is_set(), what="daemon to notice")
    gate.release.set()  # the rest of the stream is generated while the broker is away
    wait_for(lambda: d.server.scheduler.running == 0, what="generation to finish")
    broker.start()
    [(c, final)] = dev.wait_finals(1)
    # QoS 1 is at-least-once: a delta in flight when the broker went down may come twice; seq tells.
    deltas = [f["delta"] for f in {f["seq"]: f for _, f in dev.frames if "delta" in f}.values()]
    assert "response" in final and final["response"] == "".join(deltas)
    assert d.server.scheduler.completed == 1


def test_daemon_restart_requests_waiting_in_broker_answered_once(start_daemon, broker, device_factory, tiny_engine):
    d1 = start_daemon(broker=broker)
    mqtt_ready(d1)
    d1.stop()
    dev = device_factory().connect()
    n = 8
    for i in range(n):
        dev.request({**GEN, "id": f"w{i}"}, corr=f"w{i}".encode())
    time.sleep(0.1)
    assert dev.finals() == []
    d2 = start_daemon(broker=broker, limits__max_queued_per_requester=0)  # same client id: the broker delivers what it queued
    finals = dev.wait_finals(n)
    time.sleep(0.2)
    assert sorted(c for c, _ in dev.finals()) == sorted(f"w{i}".encode() for i in range(n))
    assert all("response" in f for _, f in finals), finals
    assert d2.server.scheduler.completed == n


def test_shared_subscription_splits_requests_between_boards(start_daemon, broker, device_factory, tmp_path):
    common = {"mqtt__shared_group": "farm", "mqtt__pool_topic": "edged/pool/request", "queue_size": 100,
              "limits__max_queued_per_requester": 0}  # one device sends all 20 at once
    a = start_daemon(broker=broker, mqtt__node="a", **common)
    b = start_daemon(broker=broker, mqtt__node="b", socket__path=str(tmp_path / "b.sock"), **common)
    mqtt_ready(a)
    mqtt_ready(b)
    time.sleep(0.1)  # let both SUBACKs land
    dev = device_factory().connect()
    n = 20
    for i in range(n):
        dev.request({**GEN, "options": {"num_predict": 2}}, corr=f"p{i}".encode(), topic="edged/pool/request")
    dev.wait_finals(n)
    assert sorted(c for c, _ in dev.finals()) == sorted(f"p{i}".encode() for i in range(n))
    assert a.server.scheduler.completed + b.server.scheduler.completed == n
    assert a.server.scheduler.completed > 0 and b.server.scheduler.completed > 0


def test_ask_cli_over_mqtt(start_daemon, broker):
    import subprocess

    from helpers import edged_exe

    d = start_daemon(broker=broker)
    mqtt_ready(d)
    out = subprocess.run(
        [edged_exe(), "ask", "--mqtt", f"127.0.0.1:{broker.port}", "--node", "testnode", "--num-predict", "4", "--json", "hi"],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    frames = [json.loads(line) for line in out.stdout.splitlines()]
    assert frames[-1]["done"] and "response" in frames[-1]



def test_status_health_models_ops_over_mqtt(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_ready(d)
    dev = device_factory().connect()
    for op in ("status", "health", "models"):
        dev.request({"id": op, "op": op}, corr=op.encode())
    finals = dict(dev.wait_finals(3))
    assert finals[b"status"]["status"]["model"] == "tiny"
    assert finals[b"status"]["status"]["transports"]["mqtt"]["connected"] is True
    assert finals[b"health"]["health"] == "ok" and finals[b"models"]["models"][0]["name"] == "tiny"


def test_username_password_from_config_and_wrong_password_never_crashes(start_daemon, tmp_path, device_factory):
    import subprocess

    from helpers import Broker

    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "edged", "s3cret"], check=True, capture_output=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "dev", "devpw"], check=True, capture_output=True)
    b = Broker(tmp_path / "authbroker", extra=("allow_anonymous false", f"password_file {pw}"))
    b.start()
    try:
        bad = start_daemon(broker=b, mqtt__username="edged", mqtt__password="wrong", mqtt__node="bad",
                           socket__path=str(tmp_path / "bad.sock"))  # fmt: skip
        good = start_daemon(broker=b, mqtt__username="edged", mqtt__password="s3cret")
        mqtt_ready(good)
        dev = Device(b)
        dev.c.username_pw_set("dev", "devpw")
        dev.connect()
        dev.request(GEN, corr=b"auth")
        assert "response" in dev.wait_finals(1)[0][1]
        # the refused daemon keeps retrying in the background and keeps serving its socket
        bad_t = next(t for t in bad.server.transports if t.name == "mqtt")
        assert not bad_t.connected.is_set()
        with bad.client() as c:
            assert "response" in c.call(GEN)
        dev.close()
    finally:
        b.stop()


def test_tls_with_ca_and_client_certificate(start_daemon, tmp_path):
    """mosquitto with a TLS listener that requires a client certificate."""
    import shutil
    import subprocess

    import pytest
    from helpers import Broker

    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path / "pki"
    d.mkdir()

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=edged-test-ca")
    for name in ("server", "client"):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={'localhost' if name == 'server' else 'edged'}")
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", str(ext))
    b = Broker(tmp_path / "tlsbroker", extra=(
        "allow_anonymous true", f"cafile {d}/ca.crt", f"certfile {d}/server.crt", f"keyfile {d}/server.key",
        "require_certificate true"))  # fmt: skip
    b.start()
    try:
        dm = start_daemon(broker=b, mqtt__tls_ca=str(d / "ca.crt"), mqtt__tls_cert=str(d / "client.crt"),
                          mqtt__tls_key=str(d / "client.key"))  # fmt: skip
        mqtt_ready(dm)
        dev = Device(b)
        dev.c.tls_set(ca_certs=str(d / "ca.crt"), certfile=str(d / "client.crt"), keyfile=str(d / "client.key"))
        dev.connect()
        dev.request(GEN, corr=b"tls")
        assert "response" in dev.wait_finals(1)[0][1]
        dev.close()
    finally:
        b.stop()


def test_request_arriving_during_shutdown_goes_to_the_next_run(start_daemon, broker, device_factory):
    d1 = start_daemon(broker=broker, shutdown_grace=30.0)
    gate = Gate(at=1)
    d1.server.scheduler.token_hooks.append(gate)
    t1 = mqtt_ready(d1)
    dev = device_factory().connect()
    dev.request({**GEN, "id": "A"}, corr=b"A")
    assert gate.reached.wait(WAIT)
    d1.server.request_stop()
    wait_for(lambda: not t1.accepting, what="daemon to stop accepting")
    dev.request({**GEN, "id": "B"}, corr=b"B")  # delivered to d1 but never acknowledged by it
    time.sleep(0.2)
    gate.release.set()  # A finishes within the grace period
    d1.thread.join(WAIT)
    assert [c for c, _ in dev.finals()] == [b"A"]
    d2 = start_daemon(broker=broker)
    finals = dict(dev.wait_finals(2))
    assert "response" in finals[b"A"] and "response" in finals[b"B"]
    assert d1.server.scheduler is None and d2.server.scheduler.completed == 1


def test_shared_group_on_the_wildcard_request_topic(start_daemon, broker, device_factory, tmp_path):
    a = start_daemon(broker=broker, mqtt__node="a", mqtt__shared_group="farm", queue_size=100,
                     limits__max_queued_per_requester=0)  # one device sends all 20 at once
    b = start_daemon(broker=broker, mqtt__node="b", mqtt__shared_group="farm", queue_size=100,
                     limits__max_queued_per_requester=0, socket__path=str(tmp_path / "b.sock"))  # fmt: skip
    mqtt_ready(a)
    mqtt_ready(b)
    time.sleep(0.1)  # let both SUBACKs land
    dev = device_factory().connect()
    n = 20
    for i in range(n):  # any node's request topic: the group splits them
        dev.request({**GEN, "options": {"num_predict": 2}}, corr=f"g{i}".encode(), topic=f"edged/{'ab'[i % 2]}/request")
    dev.wait_finals(n)
    time.sleep(0.1)
    assert sorted(c for c, _ in dev.finals()) == sorted(f"g{i}".encode() for i in range(n))
    assert a.server.scheduler.completed + b.server.scheduler.completed == n
