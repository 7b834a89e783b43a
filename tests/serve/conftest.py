"""Fixtures for the serving layer: daemons in a thread on the tiny model (the broker and
devices come from tests/conftest.py, the helpers from tests/helpers.py)."""

from __future__ import annotations

import pytest
from helpers import DaemonThread, daemon_config


@pytest.fixture
def start_daemon(tiny_engine, tiny_store, tmp_path):
    started: list[DaemonThread] = []

    def start(*, broker=None, engine="tiny", **over) -> DaemonThread:
        cfg = daemon_config(tmp_path, tiny_store.root, broker=broker, **over)
        d = DaemonThread(cfg, engine=tiny_engine if engine == "tiny" else engine, store=tiny_store).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
