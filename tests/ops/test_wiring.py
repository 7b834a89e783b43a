"""The governor inside a real Server (tiny model, in-process): token cap, context cap,
pacing hook, idle unload under memory pressure, MQTT telemetry/info on a level change,
journald fields."""

from __future__ import annotations

import logging
import subprocess

import pytest
from helpers import DaemonThread, daemon_config, wait_for

from edged.ops.systemd import Notifier
from edged.ops.wiring import _JournalFields, attach
from edged.serve.config import from_dict
from edged.serve.server import Server


class Running(DaemonThread):
    """A daemon in a thread with the ops layer attached (no systemd)."""

    def __init__(self, cfg_dict, engine):
        super().__init__(cfg_dict, engine=engine)
        self.ops = attach(self.server, notifier=Notifier(env={}))


def test_token_cap_context_cap_and_pacing(tmp_path, tiny_engine, fakesys):
    gov = {"root": str(fakesys.root), "interval": 60, "token_cap": [0, 0, 5, 3], "duty": [1.0, 1.0, 0.5, 0.25]}
    with Running(daemon_config(tmp_path, "/unused", governor=gov), tiny_engine) as r:
        g = r.ops.governor
        assert r.ops.runner is not None and tiny_engine.runner is r.ops.runner  # throttled runner in place
        assert g.kv_bytes_per_token == tiny_engine.info.kv_bytes(1)
        req = {"prompt": "hello", "options": {"num_predict": 40, "temperature": 0, "stop": []}}
        free = r.call({"id": 1, **req})
        fakesys.temp(77)
        g.update()
        assert g.level_name == "hot" and r.ops.runner.threads == g.threads == 1
        capped = r.call({"id": 2, **req})
        assert capped["eval_count"] <= 5 < free["eval_count"] or free["eval_count"] <= 5
        assert g.paced_s > 0  # the token hook paced the hot stream
        # memory tight: the context a request may use shrinks to what fits
        fakesys.temp(40)
        fakesys.cgroup(100, high_mb=100 + 64 + 100)  # 100 MiB headroom -> tight
        g.update()
        assert g.memory_state == "tight" and g.context_cap
        opts = {"num_predict": 4, "temperature": 0}
        ok = r.call({"id": 3, "prompt": "hello", "options": opts})
        assert ok.get("done"), ok
        st = r.call({"op": "status"})
        assert st["status"]["governor"]["memory"] == "tight"
    # the core cap was released when the level went back to normal
    import os

    assert len(os.sched_getaffinity(0)) == len(r.ops.runner.cap.allowed)


def test_memory_critical_unloads_the_idle_model_and_refuses(tmp_path, tiny_store, fakesys):
    from edged.models.loading import load_engine

    engine = load_engine("tiny", store=tiny_store)  # our own: this test unloads it
    gov = {"root": str(fakesys.root), "interval": 60}
    with Running(daemon_config(tmp_path, tiny_store.root, governor=gov), engine) as r:
        assert r.server.scheduler.engine is not None
        fakesys.cgroup(990, max_mb=1000)  # 10 MiB below memory.max: critical
        r.ops.governor.update()
        assert r.ops.governor.memory_state == "critical"
        wait_for(lambda: r.server.scheduler.engine is None, "the idle model to be unloaded")
        busy = r.call({"id": 1, "prompt": "hi"})
        assert busy["error"]["code"] == "busy" and busy["error"]["reason"] == "memory"
        assert r.call({"op": "status"})["status"]["loaded"] is False
        # pressure gone: the next request reloads the model
        fakesys.cgroup(100, max_mb=1000)
        r.ops.governor.update()
        ok = r.call({"id": 2, "prompt": "hi", "options": {"num_predict": 2}})
        assert ok.get("done"), ok


@pytest.mark.skipif(subprocess.run(["which", "mosquitto"], capture_output=True).returncode != 0,
                    reason="mosquitto not installed")
def test_level_change_on_mqtt_telemetry_and_info(tmp_path, tiny_engine, fakesys, broker, device_factory):
    got = device_factory().connect("edged/t1/#").messages
    cfg = daemon_config(tmp_path, "/unused", broker=broker, governor={"root": str(fakesys.root), "interval": 60},
                        mqtt={"node": "t1", "telemetry_interval": 0})
    with Running(cfg, tiny_engine) as r:
        mq = next(t for t in r.server.transports if t.name == "mqtt")
        wait_for(mq.connected.is_set, "daemon connected to MQTT")
        fakesys.temp(85)
        r.ops.governor.update()
        wait_for(lambda: any(t.endswith("/telemetry") and "change" in p for t, p in got), "telemetry")
        wait_for(lambda: any(t.endswith("/info") and (p.get("governor") or {}).get("level") == "critical"
                             for t, p in got), "info with the level")
        tel = next(p for t, p in got if t.endswith("/telemetry") and "change" in p)
        assert tel["change"]["new"] == "critical" and "85.0 C" in tel["change"]["cause"]
        assert tel["governor"]["level"] == "critical"
        fakesys.temp(40)
        r.ops.governor.update()


def test_journal_fields_filter(tmp_path):
    cfg = from_dict(daemon_config(tmp_path, "/unused"))
    server = Server(cfg)
    server.model_info = {"name": "tiny"}
    rec = logging.LogRecord("edged", logging.INFO, __file__, 1, "x", None, None)
    assert _JournalFields(server).filter(rec) and rec.MODEL == "tiny"
    assert not hasattr(rec, "REQUEST_ID")  # not on the worker thread / nothing running
