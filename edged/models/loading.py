"""Open an installed model by name (or folder) and load it into an engine.

The engine takes a model folder; resolving names against a store, verifying the
files and turning a damaged file into a clear error happen here.
"""

from __future__ import annotations

import time
from pathlib import Path

from edged.engine.engine import Engine
from edged.engine.runner import EngineConfig
from edged.errors import ModelCorrupt
from edged.models.store import MANIFEST, Model, ModelStore


def open_model(name_or_path: str | Path, *, store: ModelStore | None = None) -> tuple[ModelStore, Model]:
    """A model by store name, or by the path of a model folder (its parent is the store)."""
    p = Path(name_or_path)
    if p.is_dir() and (p / MANIFEST).is_file():
        store, name = ModelStore(p.parent), p.name
    else:
        store, name = store or ModelStore(), str(name_or_path)
    return store, store.get(name)


def load_engine(name_or_path: str | Path, *, config: EngineConfig | None = None, store: ModelStore | None = None) -> Engine:
    config = config or EngineConfig()
    t0 = time.perf_counter_ns()
    store, model = open_model(name_or_path, store=store)
    store.verify(model, mode=config.verify)
    try:
        return Engine(model, config, load_ns=time.perf_counter_ns() - t0)
    except ModelCorrupt:
        raise
    except Exception as e:  # onnxruntime and tokenizers refuse a damaged file with their own exceptions
        raise ModelCorrupt(f"model {model.name!r} could not be loaded: {e}") from None
