"""Shared fixtures: real models, prepared once per test run.

- tiny_store / tiny_engine: a 2-layer random Llama converted through `edged convert`
  (seconds); for engine mechanics.
- smollm2_store / smollm2_engine: the real default model, pulled into
  .cache/test-home (kept between local runs, rebuilt on a clean CI checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SMOLLM2_HOME = Path(os.environ.get("EDGED_TEST_HOME", REPO / ".cache" / "test-home"))


def edged_cli(*args, home: Path, timeout: float = 900, input: str | None = None, check: bool = False):
    """Run the real `edged` console script with EDGED_HOME=home."""
    env = {**os.environ, "EDGED_HOME": str(home)}
    exe = Path(sys.executable).with_name("edged")
    return subprocess.run(
        [str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout, input=input, check=check
    )


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
