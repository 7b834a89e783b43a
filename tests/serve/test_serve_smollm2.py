"""End to end with the real SmolLM2 int8: real answers over both transports."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers import WAIT, DaemonThread, daemon_config, wait_for

pytestmark = pytest.mark.slow

Q = {"prompt": "What is the capital of France?", "options": {"temperature": 0, "num_predict": 16}}


@pytest.fixture
def smol_daemon(smollm2_engine, smollm2_store, broker, tmp_path):
    cfg = daemon_config(tmp_path, smollm2_store.root, broker=broker, model="smollm2-135m", engine__threads=2)
    d = DaemonThread(cfg, engine=smollm2_engine, store=smollm2_store).start()
    t = next(t for t in d.server.transports if t.name == "mqtt")
    wait_for(lambda: t.connected.is_set(), what="mqtt connected")
    yield d
    d.stop()


def test_socket_answers_paris(smol_daemon):
    with smol_daemon.client() as c:
        frames = list(c.request({"id": "fr", **Q}))
        chat = c.call({"id": "chat", "op": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "options": {"temperature": 0, "num_predict": 16}})  # fmt: skip
    assert "Paris" in frames[-1]["response"] and len(frames) > 2
    assert "Paris" in chat["message"]["content"]


@pytest.mark.skipif(not shutil.which("mosquitto_rr"), reason="mosquitto-clients not installed")
def test_mosquitto_rr_gets_the_whole_answer_in_one_message(smol_daemon, broker):
    out = subprocess.run(
        ["mosquitto_rr", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "edged/testnode/request",
         "-e", "rr/reply", "-m", json.dumps(Q), "-W", str(WAIT)],
        capture_output=True, text=True, timeout=WAIT + 5,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    frame = json.loads(out.stdout)
    assert frame["done"] is True and "Paris" in frame["response"] and frame["eval_count"] > 0
