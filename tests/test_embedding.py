"""The token embedding table outside the graph, and what stays resident after a load."""

import os
import re

import numpy as np
import pytest

from edged.engine.embedding import EmbeddingTable, write_table
from edged.errors import ModelCorrupt


def test_rows_match_the_models_fp32_embedding(tiny_hf, tiny_store):
    from safetensors.numpy import load_file

    table = load_file(str(tiny_hf / "model.safetensors"))["model.embed_tokens.weight"]
    model = tiny_store.get("tiny")
    assert model.manifest["files_by_role"]["embedding"] == "embedding.bin"
    emb = EmbeddingTable(model.file("embedding"))
    ids = np.array([[0, 5, 399], [7, 7, 123]])
    rows = emb.rows(ids)
    assert rows.shape == (2, 3, table.shape[1]) and rows.dtype == np.float32
    # symmetric int8 per block: error at most half a step of the block's scale
    step = np.abs(table[ids]).reshape(2, 3, -1, emb.block).max(-1, keepdims=True) / 127
    assert np.all(np.abs(rows - table[ids]).reshape(step.shape[:-1] + (emb.block,)) <= step / 2 + 1e-6)
    # a decode step's single token takes a shorter path: same values, same shapes
    np.testing.assert_array_equal(emb.rows([[399]]), rows[:1, 2:3])
    np.testing.assert_array_equal(emb.rows([7]), rows[1, :1])
    assert emb.rows([[5]]).dtype == np.float32


def test_the_quantized_graph_takes_embeddings_not_ids(tiny_store):
    import onnx

    g = onnx.load(str(tiny_store.get("tiny").file("model")), load_external_data=False).graph
    assert [i.name for i in g.input][:2] == ["inputs_embeds", "attention_mask"]
    assert not any(n.op_type.startswith("Gather") and "embed" in n.name for n in g.node)


def test_bad_ids_and_bad_files_are_named(tmp_path):
    path = tmp_path / "e.bin"
    write_table(path, np.ones((4, 8), np.int8), np.full((4, 2), 0.5, np.float32))
    emb = EmbeddingTable(path)
    np.testing.assert_array_equal(emb.rows([3]), np.full((1, 8), 0.5, np.float32))
    for bad, tok in (([1, 4], 4), ([[4]], 4), ([-1], -1)):
        with pytest.raises(ValueError, match=f"token id {tok} is outside the vocabulary"):
            emb.rows(bad)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(ModelCorrupt, match="truncated"):
        EmbeddingTable(path)
    path.write_bytes(b"not a table at all" * 4)
    with pytest.raises(ModelCorrupt, match="not an edged embedding table"):
        EmbeddingTable(path)


def _resident_bytes_of(folder: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if parts and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", parts[0]):
                inside = len(parts) == 6 and parts[5].strip().startswith(folder)
            elif inside and parts[:1] == ["Rss:"]:
                total += int(parts[1]) * 1024
    return total


def test_weight_file_pages_are_not_kept_resident_after_load(smollm2_store):
    from edged.models.loading import load_engine
    from edged.engine.request import GenerateRequest

    folder = os.path.realpath(smollm2_store.get("smollm2-135m").path) + os.sep
    engine = load_engine("smollm2-135m", store=smollm2_store)
    # Without the release, onnxruntime's mappings keep ~16 MB of block scales resident.
    assert _resident_bytes_of(folder) < 4 << 20
    text = engine.generate(GenerateRequest.from_dict(
        {"prompt": "What is the capital of France?", "options": {"temperature": 0, "num_predict": 12}})).run()
    assert "Paris" in text  # the released pages were never needed (or came back from the file)
