"""The prompt-lookup part of the benchmark (bench/lookup.py, bench/drivers/_lookup.py):
the tasks, the ratios from paired rounds, and the edged driver on the tiny model.
No speed is asserted."""

from __future__ import annotations

import sys

import pytest

from bench import DRIVERS, harness, lookup


def test_tasks_fit_the_model_and_ground_on_the_log(tiny_store):
    spec = lookup.spec_for(tiny_store.get("tiny"))
    ctx = tiny_store.get("tiny").manifest["context_length"]
    assert spec["tasks"] and spec["n_gen"] <= ctx // 4
    for t in spec["tasks"]:
        assert len(t["ids"]) + spec["n_gen"] <= ctx, t["name"]
        assert t["text"].endswith("assistant\n")  # the chat template's generation prompt
    kinds = {t["kind"] for t in spec["tasks"]}
    assert kinds == {"grounded", "open"}
    enc = lambda s: s.split()  # noqa: E731  (a word is a token: a 300-word log)
    log = lookup.sensor_log(enc, 300)
    assert 300 <= len(enc(log)) < 320
    full = lookup.build(enc, lambda m: m, [0], context=10_000)
    grounded = [t for t in full["tasks"] if t["kind"] == "grounded"]
    assert [t["name"] for t in grounded] == ["extract", "summarise", "json"] and not full["skipped"]
    assert all(log in t["text"] for t in grounded)


def _task(kind, tokens, seconds, **extra):
    return {"gen_tokens": tokens, "decode_s": seconds, "ttft_s": 0.1, **extra}


def _edged(on, off):
    return {"lookup": {"tasks": {
        "extract": {"kind": "grounded", "on": _task("g", 101, 1.0 / on, draft_tokens=80, accepted_tokens=60),
                    "off": _task("g", 101, 1.0 / off, draft_tokens=0, accepted_tokens=0)},
        "story": {"kind": "open", "on": _task("o", 51, 0.5 / on), "off": _task("o", 51, 0.5 / off)}}}}


def _llama(plain, look2, look10):
    return {"lookup": {"tasks": {
        "extract": {"kind": "grounded", "plain": _task("g", 101, 1.0 / plain), "lookup_2": _task("g", 101, 1.0 / look2),
                    "lookup_10": _task("g", 101, 1.0 / look10)},
        "story": {"kind": "open", "plain": _task("o", 51, 0.5 / plain)}}}}


def test_ratios_from_paired_rounds():
    # rates in tokens/s (100 decode tokens per second of decode time x rate)
    results = {"runs": {"edged": [_edged(200, 100), _edged(150, 100), {"error": "crashed"}],
                        "llamacpp": [_llama(100, 120, 110), _llama(100, 90, 100), _llama(100, 100, 100)]}}
    lookup.derive(results)
    r = results["lookup"]["ratios"]
    assert r["llamacpp_lookup_mode"] == "lookup_2"  # the faster llama.cpp draft length (median 105 vs 100)
    assert results["lookup_decode_ratio_vs_llamacpp_q8_0"] == pytest.approx((2.0 + 1.5) / 2)
    assert results["lookup_decode_ratio_vs_llamacpp_lookup"] == pytest.approx((200 / 120 + 150 / 90) / 2)
    assert results["lookup_open_ended_ratio"] == pytest.approx((2.0 + 1.5) / 2)
    assert r["lookup_grounded_speedup"] == pytest.approx(1.75)
    assert results["lookup"]["tasks"]["extract"]["edged_on"]["accepted_tokens"] == 60
    md = "\n".join(lookup.markdown(results))
    assert "lookup_decode_ratio_vs_llamacpp_q8_0" in md and "| extract | grounded |" in md
    # a results file with only a standalone lookup run keeps its runs apart from the main ones
    alone = {"runs": {"edged": [{"prompts": {}}]}, "lookup_runs": results["runs"]}
    lookup.derive(alone)
    assert alone["lookup_open_ended_ratio"] == results["lookup_open_ended_ratio"]


def test_edged_driver_measures_lookup_on_and_off(tiny_store):
    spec = {"threads": 1, "prompts": [], "lookup_only": True, "model": "tiny", "store": str(tiny_store.root),
            "lookup": lookup.spec_for(tiny_store.get("tiny"))}
    r = harness.run_driver([sys.executable, str(DRIVERS / "driver_edged.py")], spec, timeout=600)
    assert "error" not in r, r.get("error")
    lk = r["lookup"]
    assert lk["speculative_available"] is True
    assert set(lk["tasks"]) == {t["name"] for t in spec["lookup"]["tasks"]}
    for name, t in lk["tasks"].items():
        assert t["on"]["ids_match"] and t["off"]["ids_match"]
        assert t["off"]["draft_tokens"] == 0
        assert 0 <= t["on"]["accepted_tokens"] <= t["on"]["draft_tokens"]
        assert t["on"]["gen_tokens"] >= 1 and t["off"]["gen_tokens"] >= 1
    results = {"runs": {"edged": [r]}}
    lookup.derive(results)
    assert results["lookup_open_ended_ratio"] is None or results["lookup_open_ended_ratio"] > 0
