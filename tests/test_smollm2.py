"""Integration on the real SmolLM2-135M int8 model (pulled once per test run)."""

import json
import shutil

import pytest

from helpers import SMOLLM2_HOME, edged_cli
from edged.engine.request import GenerateRequest
from edged.errors import ModelCorrupt

pytestmark = pytest.mark.slow


def test_capital_of_france_via_the_cli(smollm2_store):
    r = edged_cli("run", "smollm2-135m", "What is the capital of France?", "--temperature", "0", home=SMOLLM2_HOME)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_show_prints_the_gate_and_manifest_records_it(smollm2_store):
    r = edged_cli("show", "smollm2-135m", home=SMOLLM2_HOME)
    assert r.returncode == 0, r.stderr
    assert "quality gate: passed" in r.stdout and "perplexity ratio" in r.stdout and "agreement" in r.stdout
    g = smollm2_store.get("smollm2-135m").manifest["gate"]
    assert g["perplexity_ratio"] <= 1.10 and g["agreement"] >= 0.80
    assert g["perplexity_fp32"] < 100  # the fp32 reference itself is a sane language model


def test_pull_again_is_a_no_op(smollm2_store):
    before = smollm2_store.get("smollm2-135m").manifest["created"]
    r = edged_cli("pull", "smollm2-135m", home=SMOLLM2_HOME, timeout=120)
    assert r.returncode == 0 and "up to date" in r.stdout
    assert smollm2_store.get("smollm2-135m").manifest["created"] == before


def test_chat_and_seeded_sampling(smollm2_engine):
    msgs = [{"role": "user", "content": "Name a color of the sky on a clear day."}]
    req = GenerateRequest.from_dict({"messages": msgs, "options": {"temperature": 0.9, "seed": 7, "num_predict": 24}})
    a = smollm2_engine.generate(req).run()
    b = smollm2_engine.generate(req).run()
    assert a == b and a.strip()
    other = smollm2_engine.generate(GenerateRequest.from_dict({"messages": msgs, "options": {"temperature": 0.9, "seed": 8, "num_predict": 24}})).run()
    assert other != a  # the seed, not luck, made them equal


def test_streaming_deltas_join_to_the_text(smollm2_engine):
    g = smollm2_engine.generate(GenerateRequest.from_dict({"prompt": "Write one sentence about Grüße and 東京.", "options": {"temperature": 0, "num_predict": 40}}))
    deltas = list(g)
    assert "".join(deltas) == g.text and not any("\ufffd" in d for d in deltas)
    assert g.stats["eval_count"] > 0 and g.stats["done_reason"] in ("stop", "length")


def test_corrupted_model_file_gives_a_clear_error(smollm2_store, tmp_path):
    src = smollm2_store.get("smollm2-135m").path
    home = tmp_path / "home"
    shutil.copytree(src, home / "models" / "smollm2-135m")
    with open(home / "models" / "smollm2-135m" / "model.onnx.data", "r+b") as f:
        f.seek(1_000_000)
        f.write(b"\x00garbage\x00")
    r = edged_cli("run", "smollm2-135m", "hi", home=home)
    assert r.returncode == 1 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    from edged.models.loading import load_engine
    from edged.models.store import ModelStore

    with pytest.raises(ModelCorrupt, match="model.onnx.data"):
        load_engine("smollm2-135m", store=ModelStore(home / "models"))


def test_gate_refuses_optimums_arm64_scheme_on_x86(smollm2_store, tmp_path):
    """uint8 activations x int8 per-channel weights (optimum's arm64 config) on x86.

    Without VNNI the u8s8 kernels saturate and the output is garbage (agreement 0.02
    measured on an AVX2 machine); with AVX-512 VNNI they do not, and the per-channel
    scheme is refused for lower agreement (0.763 < 0.80 measured 2026-12-02)."""
    from edged.models.registry import resolve

    _, path = resolve("smollm2-135m")
    home = tmp_path / "home"
    r = edged_cli("convert", str(path), "--name", "forced-arm", "--target", "x86", "--scheme", "int8-dynamic", home=home)
    assert r.returncode == 1, r.stdout
    assert "quality gate refused" in r.stderr
    assert "perplexity ratio" in r.stderr or "agreement" in r.stderr
    assert edged_cli("list", "--json", home=home).stdout.strip() == "[]"
