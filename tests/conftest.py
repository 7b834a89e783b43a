"""Shared fixtures: real models, prepared once per test run, and a real broker.

- tiny_store / tiny_engine: a 2-layer random Llama converted through `edged convert`
  (seconds); for engine mechanics.
- smollm2_store / smollm2_engine: the real default model, pulled into
  .cache/test-home (kept between local runs, rebuilt on a clean CI checkout).
- broker / device_factory: mosquitto on a free port for one test, and paho devices on it.
The helpers these use are in helpers.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SMOLLM2_HOME, Broker, Device, edged_cli  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    from tinymodel import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_store(tiny_hf, tmp_path_factory):
    from edged.models.convert import convert
    from edged.models.store import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("tiny-home") / "models")
    convert(tiny_hf, "tiny", store=store)
    return store


@pytest.fixture(scope="session")
def tiny_engine(tiny_store):
    from edged.models.loading import load_engine

    return load_engine("tiny", store=tiny_store)


@pytest.fixture(scope="session")
def smollm2_store():
    from edged.models.store import ModelStore

    proc = edged_cli("pull", "smollm2-135m", home=SMOLLM2_HOME)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ModelStore(SMOLLM2_HOME / "models")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_store):
    from edged.models.loading import load_engine

    return load_engine("smollm2-135m", store=smollm2_store)


@pytest.fixture
def broker(tmp_path):
    with Broker(tmp_path / "broker") as b:
        yield b


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
