"""Fixtures for the serving layer: a real mosquitto on a free port (own config
file, persistence in a tmp dir), daemons in a thread, paho devices. The helpers
live in serve_helpers.py."""

from __future__ import annotations

import pytest
from serve.serve_helpers import Broker, DaemonThread, Device, make_config


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def start_daemon(tiny_engine, tiny_store, tmp_path):
    started: list[DaemonThread] = []

    def start(*, broker=None, engine="tiny", **over) -> DaemonThread:
        cfg = make_config(tmp_path, broker=broker, models_dir=tiny_store.root, **over)
        d = DaemonThread(cfg, engine=tiny_engine if engine == "tiny" else engine, store=tiny_store).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.thread.is_alive():
            d.stop()


@pytest.fixture
def device_factory(broker):
    made: list[Device] = []

    def make(**kw) -> Device:
        d = Device(broker, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        try:
            d.close()
        except Exception:
            pass
