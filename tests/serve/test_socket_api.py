"""The Unix socket API against a real daemon (in a thread) and the tiny model."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from helpers import WAIT, Gate, daemon_config, read_finals, wait_for

from edged.serve.client import SocketClient

GEN = {"prompt": "hello there", "options": {"num_predict": 8, "temperature": 0}}
STATS = ("done_reason", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration", "load_duration", "total_duration")


def test_generate_streams_deltas_then_final_with_ollama_stats(start_daemon):
    d = start_daemon()
    with d.client() as c:
        frames = list(c.request({"id": "a1", **GEN}))
    deltas, final = frames[:-1], frames[-1]
    assert all(set(f) == {"id", "delta", "seq"} and f["id"] == "a1" for f in deltas)
    assert [f["seq"] for f in deltas] == list(range(1, len(deltas) + 1))
    assert final["done"] is True and final["id"] == "a1" and final["model"] == "tiny"
    assert final["response"] == "".join(f["delta"] for f in deltas)
    for key in STATS:
        assert key in final
    assert final["eval_count"] <= 8


def test_stream_false_gives_one_frame_and_chat_gives_message(start_daemon):
    d = start_daemon()
    with d.client() as c:
        frames = list(c.request({"id": 1, **GEN, "stream": False}))
        assert len(frames) == 1 and isinstance(frames[0]["response"], str)
        chat = c.call({"id": 2, "op": "chat", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}})
        assert chat["message"]["role"] == "assistant" and "response" not in chat
        # op defaults to chat when messages are given
        chat2 = c.call({"id": 3, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}})
        assert "message" in chat2


def test_status_models_health_ops(start_daemon):
    d = start_daemon()
    with d.client() as c:
        c.call({"id": "g", **GEN})
        st = c.call({"id": "s", "op": "status"})["status"]
        for key in ("model", "quantization", "threads", "queue_depth", "in_flight", "tokens_per_second", "uptime_s", "rss_bytes", "governor"):
            assert key in st, key
        assert st["model"] == "tiny" and st["governor"] is None and st["rss_bytes"] > 0
        assert st["tokens_per_second"] > 0 and st["requests_completed"] == 1
        models = c.call({"id": "m", "op": "models"})["models"]
        assert models[0]["name"] == "tiny" and models[0]["loaded"] is True
        assert c.call({"id": "h", "op": "health"})["health"] == "ok"


def test_several_requests_per_connection_are_matched_by_id(start_daemon):
    d = start_daemon(limits__max_queued_per_requester=0)  # five at once from one requester
    with d.client() as c:
        for i in range(5):
            c.send({"id": f"r{i}", **GEN})
        finals = read_finals(c, 5)
        assert sorted(finals) == [f"r{i}" for i in range(5)]
        assert all("response" in f for f in finals.values())


def test_hundred_concurrent_connections(start_daemon):
    d = start_daemon(queue_size=200)
    n = 120
    results: dict = {}
    errors: list = []

    def one(i):
        try:
            with SocketClient(d.socket_path, timeout=WAIT) as c:
                results[i] = c.call({"id": i, "prompt": f"p{i}", "stream": i % 2 == 0, "options": {"num_predict": 3}})
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert len(results) == n
    assert all(r["id"] == i and "response" in r for i, r in results.items())


MALFORMED_SOCKET = [
    b"not json", b"{", b"}", b"[]", b"[1,2]", b"123", b'"string"', b"null", b"true", b"{'single': 'quotes'}",
    b'{"prompt": "x",}', b"\xff\xfe\xfd", b'{"prompt": 5}', b'{"prompt": null}', b'{"prompt": ["a"]}',
    b'{"prompt": {"a": 1}}', b'{"prompt": true}', b'{"op": 5}', b'{"op": "explode"}', b'{"op": null, "foo": 1}',
    b'{"op": "generate"}', b'{"op": "chat"}', b'{"op": "chat", "messages": []}', b'{"op": "chat", "messages": "hi"}',
    b'{"op": "chat", "messages": [1]}', b'{"op": "chat", "messages": [{"role": "alien", "content": "x"}]}',
    b'{"op": "chat", "messages": [{"role": "user"}]}', b'{"op": "chat", "messages": [{"role": "user", "content": 3}]}',
    b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', b'{"prompt": "x", "options": 3}',
    b'{"prompt": "x", "options": []}', b'{"prompt": "x", "options": {"temperature": "hot"}}',
    b'{"prompt": "x", "options": {"temperature": -1}}', b'{"prompt": "x", "options": {"top_p": 2}}',
    b'{"prompt": "x", "options": {"num_predict": 0}}', b'{"prompt": "x", "options": {"num_predict": 1.5}}',
    b'{"prompt": "x", "options": {"bogus": 1}}', b'{"prompt": "x", "options": {"stop": 5}}',
    b'{"prompt": "x", "options": {"stop": [""]}}', b'{"prompt": "x", "options": {"seed": -3}}',
    b'{"prompt": "x", "stream": "yes"}', b'{"prompt": "x", "raw": 1}', b'{"prompt": "x", "system": 7}',
    b'{"prompt": "x", "priority": "high"}', b'{"prompt": "x", "priority": 1000}', b'{"prompt": "x", "timeout_ms": -5}',
    b'{"prompt": "x", "timeout_ms": true}', b'{"prompt": "x", "id": {"a": 1}}', b'{"prompt": "x", "id": ""}',
    b'{"prompt": "x", "id": true}', b'{"prompt": "x", "model": 3}', b'{"prompt": "x", "model": "no-such-model"}',
    b'{"prompt": "x", "unknown_field": 1}', b'{"op": "cancel"}', b'{"op": "cancel", "target": [1]}',
    b'{"prompt": "", "raw": true}', b'{"prompt": "x", "raw": true, "messages": []}',
    b'{"prompt": "x", "options": {"num_ctx": 0}}', b'{"prompt": "x", "options": {"truncate": "yes"}}',
    b'{"prompt": "' + b"y" * 40_000 + b'"}',  # over max_prompt_chars
]


def test_malformed_corpus_gets_error_frames_and_connection_keeps_working(start_daemon):
    assert len(MALFORMED_SOCKET) >= 50
    d = start_daemon()
    with d.client() as c:
        for i, line in enumerate(MALFORMED_SOCKET):
            c.sock.sendall(line + b"\n")
            f = c.read()
            assert f.get("done") is True and "error" in f, (line[:80], f)
            assert f["error"]["code"] and f["error"]["message"], f
            assert c.call({"id": f"h{i}", "op": "health"})["health"] == "ok"
        assert "response" in c.call({"id": "ok", **GEN})
    with d.client() as c:  # and the daemon still serves new connections
        assert "response" in c.call({"id": "ok2", **GEN})


def test_error_codes_are_specific(start_daemon):
    d = start_daemon()
    with d.client() as c:
        c.sock.sendall(b"nope\n")
        assert c.read()["error"]["code"] == "malformed_request"
        assert c.call({"id": 1, "op": "fly"})["error"]["code"] == "unknown_op"
        e = c.call({"id": 2, "prompt": "x", "options": {"bogus": 1}})["error"]
        assert e["code"] == "invalid_request" and e["field"] == "options.bogus"
        assert c.call({"id": 3, "prompt": "x", "model": "nope"})["error"]["code"] == "model_not_found"


def test_oversized_line_is_rejected_and_connection_continues(start_daemon):
    d = start_daemon(max_request_bytes=4096)
    with d.client() as c:
        c.sock.sendall(b'{"prompt": "' + b"z" * 20_000 + b'"}\n')
        f = c.read()
        assert f["error"]["code"] == "payload_too_large"
        assert "response" in c.call({"id": "after", **GEN})


def test_socket_mode_and_stale_socket_file(start_daemon, tmp_path):
    path = Path(daemon_config(tmp_path)["socket"]["path"])
    path.parent.mkdir(parents=True, mode=0o700)  # outside a runtime directory the daemon accepts only 0700
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a crash leaves the file behind with nobody listening
    stale.close()
    d = start_daemon()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with d.client() as c:
        assert c.call({"op": "health"})["health"] == "ok"
    d.stop()
    assert not path.exists()  # removed on a clean stop


def test_second_daemon_refuses_a_live_socket(start_daemon, tiny_engine, tiny_store, tmp_path):
    from helpers import DaemonThread

    start_daemon()
    other = DaemonThread(daemon_config(tmp_path, tiny_store.root), engine=tiny_engine)
    with pytest.raises(Exception, match="already listening"):
        other.start()


def test_peer_credentials_allowlist(start_daemon):
    d = start_daemon(socket__allow_uids=[os.getuid() + 4242], socket__allow_gids=[os.getgid() + 4242])
    with d.client() as c:
        f = c.read()
        assert f["error"]["code"] == "permission_denied"
        assert c.file.readline() == b""  # and the connection is closed
    d2_over = {"socket__allow_uids": [os.getuid()], "socket__path": str(d.config.socket.path) + "2"}
    d2 = start_daemon(**d2_over)
    with d2.client() as c:
        assert "response" in c.call(GEN)


def test_busy_when_queue_full_then_recovers(start_daemon):
    d = start_daemon(queue_size=1)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    with d.client() as c:
        c.send({"id": "run", **GEN})
        assert gate.reached.wait(WAIT)
        c.send({"id": "wait", **GEN})
        wait_for(lambda: d.server.scheduler.depth == 1, what="queued request")
        busy = c.call({"id": "over", **GEN})
        assert busy["error"]["code"] == "busy"
        assert busy["error"]["retry_after_ms"] > 0 and busy["error"]["queue_position"] == 3
        gate.release.set()
        finals = read_finals(c, 2)
        assert "response" in finals["run"] and "response" in finals["wait"]
        assert "response" in c.call({"id": "again", **GEN})


def test_expired_request_is_dropped_never_run(start_daemon):
    d = start_daemon()
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    with d.client() as c:
        c.send({"id": "run", **GEN})
        assert gate.reached.wait(WAIT)
        c.send({"id": "late", **GEN, "timeout_ms": 1})
        wait_for(lambda: d.server.scheduler.depth == 1, what="queued request")
        time.sleep(0.01)  # let its 1 ms deadline pass while it waits
        gate.release.set()
        finals = read_finals(c, 2)
    assert finals["late"]["error"]["code"] == "deadline_exceeded"
    assert "late" not in gate.seen  # no token was generated for it
    assert d.server.scheduler.completed == 1


def test_priority_runs_higher_first(start_daemon):
    d = start_daemon(limits__max_priority=100)  # senders may choose any priority
    gate = Gate(at=1)
    order = []
    d.server.scheduler.token_hooks.append(gate)
    d.server.scheduler.token_hooks.append(lambda job, n: n == 1 and order.append(job.rid))
    with d.client() as c:
        c.send({"id": "first", **GEN})
        assert gate.reached.wait(WAIT)
        c.send({"id": "low", **GEN, "priority": -5})
        c.send({"id": "mid", **GEN})
        c.send({"id": "high", **GEN, "priority": 10})
        wait_for(lambda: d.server.scheduler.depth == 3, what="3 queued")
        gate.release.set()
        read_finals(c, 4)
    assert order == ["first", "high", "mid", "low"]


def test_cancel_queued_and_running(start_daemon):
    d = start_daemon()
    gate = Gate(at=2)
    d.server.scheduler.token_hooks.append(gate)
    with d.client() as c:
        c.send({"id": "run", "prompt": "hello", "options": {"num_predict": 200, "temperature": 0}})
        assert gate.reached.wait(WAIT)
        c.send({"id": "queued", **GEN})
        wait_for(lambda: d.server.scheduler.depth == 1, what="queued request")
        c.send({"id": "c1", "op": "cancel", "target": "queued"})
        c.send({"id": "c2", "op": "cancel", "target": "run"})
        c.send({"id": "c3", "op": "cancel", "target": "nobody"})
        got = read_finals(c, 5)
    assert got["queued"]["error"]["code"] == "cancelled"
    assert got["run"]["done_reason"] == "cancel" and got["run"]["eval_count"] < 200
    assert got["c1"]["cancelled"] is True and got["c2"]["cancelled"] is True and got["c3"]["cancelled"] is False


def test_client_disconnect_frees_the_worker(start_daemon):
    d = start_daemon()
    gate = Gate(at=2)
    d.server.scheduler.token_hooks.append(gate)
    c = d.client()
    c.send({"id": "gone", "prompt": "hello", "options": {"num_predict": 200, "temperature": 0}})
    assert gate.reached.wait(WAIT)
    c.close()
    # the worker was held at token 2; it is released only by the cancel the disconnect causes
    wait_for(lambda: d.server.scheduler.running == 0, what="worker to be freed")
    assert gate.seen["gone"] <= 3 and not gate.timed_out
    gate.release.set()
    with d.client() as c2:
        assert "response" in c2.call({"id": "next", **GEN})


def test_half_closed_client_still_gets_its_answer(start_daemon):
    d = start_daemon()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(d.socket_path)
    s.sendall(json.dumps({"id": "h", **GEN, "stream": False}).encode() + b"\n")
    s.shutdown(socket.SHUT_WR)  # like `socat` or `nc -N` after stdin ends
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    frame = json.loads(data.splitlines()[-1])
    assert frame["id"] == "h" and "response" in frame


def test_keep_alive_unloads_and_next_request_reloads(start_daemon):
    d = start_daemon(keep_alive=0.0)
    with d.client() as c:
        c.call({"id": 1, **GEN})
        wait_for(lambda: d.server.scheduler.engine is None, what="idle unload")
        assert c.call({"op": "status"})["status"]["loaded"] is False
        f = c.call({"id": 2, **GEN})
        assert "response" in f and f["load_duration"] > 0  # transparently reloaded


def test_graceful_stop_sends_every_waiting_client_a_final_frame(start_daemon):
    d = start_daemon(shutdown_grace=0.0)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    with d.client() as c:
        c.send({"id": "run", "prompt": "hello", "options": {"num_predict": 200}})
        assert gate.reached.wait(WAIT)
        c.send({"id": "q1", **GEN})
        c.send({"id": "q2", **GEN})
        wait_for(lambda: d.server.scheduler.depth == 2, what="queued")
        d.server.request_stop()
        got = read_finals(c, 3)
    assert got["run"]["done_reason"] == "cancel"
    assert got["q1"]["error"]["code"] == "shutting_down" and got["q2"]["error"]["code"] == "shutting_down"
    d.thread.join(WAIT)
    assert not d.thread.is_alive()


def test_admission_hook_can_refuse(start_daemon):
    from edged.errors import Busy

    d = start_daemon()
    d.server.scheduler.admission_hooks.append(lambda job: Busy("too hot", retry_after_ms=5000))
    with d.client() as c:
        e = c.call({"id": 1, **GEN})["error"]
        assert e == {"code": "busy", "message": "too hot", "retry_after_ms": 5000}
