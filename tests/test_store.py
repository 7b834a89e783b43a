import json
import os

import pytest

from edged.errors import ModelCorrupt, ModelNotFound
from edged.models.store import ModelStore


def stage(store, name, files):
    d = store.staging(name)
    for fname, data in files.items():
        (d / fname).write_bytes(data)
    return d


MANIFEST = {"target": "x86", "quantization": {"scheme": "t"}, "files_by_role": {"model": "model.onnx"}}


def test_install_is_atomic_and_hashes_every_file(tmp_path):
    store = ModelStore(tmp_path / "models")
    d = stage(store, "m1", {"model.onnx": b"abc", "tokenizer.json": b"{}"})
    assert store.list() == []  # staging is invisible
    m = store.install(d, "m1", MANIFEST)
    assert [x.name for x in store.list()] == ["m1"]
    man = json.loads((m.path / "edged-model.json").read_text())
    assert set(man["files"]) == {"model.onnx", "tokenizer.json"}
    assert man["files"]["model.onnx"]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert not d.exists()


def test_interrupted_conversion_leaves_nothing_visible_and_is_swept(tmp_path):
    store = ModelStore(tmp_path / "models")
    d = stage(store, "half", {"model.onnx": b"partial"})
    assert store.list() == []
    with pytest.raises(ModelNotFound):
        store.get("half")
    # a staging dir whose writer is dead is swept
    dead = d.with_name(d.name.replace(f".staging-{os.getpid()}-", ".staging-999999999-"))
    os.rename(d, dead)
    store.sweep()
    assert not dead.exists()


def test_replacing_a_model_keeps_one_visible_copy(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.install(stage(store, "m", {"model.onnx": b"v1"}), "m", MANIFEST)
    store.install(stage(store, "m", {"model.onnx": b"v2"}), "m", MANIFEST)
    assert (store.get("m").path / "model.onnx").read_bytes() == b"v2"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


def test_verify_detects_corruption_and_missing_files(tmp_path):
    store = ModelStore(tmp_path / "models")
    m = store.install(stage(store, "m", {"model.onnx": b"weights" * 100, "tokenizer.json": b"{}"}), "m", MANIFEST)
    store.verify(m)  # fills the fast-path cache
    store.verify(m)
    p = m.path / "model.onnx"
    good = p.read_bytes()
    data = bytearray(good)
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))  # same size, new content and mtime
    with pytest.raises(ModelCorrupt, match="sha256 of model.onnx"):
        store.verify(m)
    p.write_bytes(good)
    store.verify(m)
    (m.path / "tokenizer.json").unlink()
    with pytest.raises(ModelCorrupt, match="tokenizer.json is missing"):
        store.verify(m)


def test_remove_and_unknown_names(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.install(stage(store, "m", {"model.onnx": b"x"}), "m", MANIFEST)
    store.remove("m")
    assert store.list() == []
    with pytest.raises(ModelNotFound, match="edged pull"):
        store.get("m")
    with pytest.raises(ValueError):
        store.staging("../evil")
