"""The bench harness's pure functions, and an edged-only run on the tiny model.
No speed is asserted: only that the numbers exist, are consistent and are written."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from edged.ops import bench


def _run(decode, ttft, rss, cold, conc=(10.0, 10.0)):
    return {
        "prompts": {
            "short": {"prompt_tokens": 40, "gen_tokens": 128, "ttft_s": ttft, "prefill_tps": 40 / ttft, "decode_tps": decode},
            "long": {"prompt_tokens": 400, "gen_tokens": 128, "ttft_s": ttft * 8, "prefill_tps": 50 / ttft,
                     "decode_tps": decode * 0.9},
        },
        "concurrency": [{"clients": 1, "aggregate_tps": conc[0], "mode": "serialised"},
                        {"clients": 4, "aggregate_tps": conc[1], "mode": "serialised"}],
        "peak_rss_single_bytes": rss, "peak_rss_bytes": rss + 50_000_000, "rss_loaded_bytes": rss // 2, "cold_start_s": cold, "weight_bytes": 150_000_000,
    }


def test_median_and_ratio_ignore_missing_values():
    assert bench.median([3, None, 1, float("nan"), 2]) == 2
    assert bench.median([]) is None
    assert bench.ratio(6, 3) == 2
    assert bench.ratio(1, 0) is None and bench.ratio(None, 1) is None and bench.ratio(float("nan"), 1) is None


def test_summarize_and_paired_ratios():
    runs = {
        "edged": [_run(60, 0.2, 300_000_000, 1.5), _run(50, 0.3, 310_000_000, 1.7), _run(70, 0.1, 290_000_000, 1.4)],
        "llamacpp": [_run(60, 0.1, 200_000_000, 1.0), _run(100, 0.1, 200_000_000, 1.0), _run(70, 0.2, 220_000_000, 1.2)],
        "ortgenai": [{"error": "driver exited 1"}, _run(25, 0.3, 400_000_000, 2.0), _run(35, 0.1, 400_000_000, 2.0)],
    }
    s = bench.summarize(runs)
    assert s["edged"]["prompts"]["short"]["decode_tps"] == 60
    assert s["edged"]["prompts"]["short"]["ttft_s"] == 0.2
    assert s["edged"]["cold_start_s"] == 1.5
    assert s["edged"]["peak_rss_single_mb"] == 300 and s["edged"]["peak_rss_mb"] == 350
    assert s["edged"]["concurrency"]["4"] == {"aggregate_tps": 10.0, "mode": "serialised"}
    assert s["ortgenai"]["rounds"] == 2  # the failed run is left out
    r = bench.ratios(runs, ["short", "long"], {"short": 40, "long": 400})
    # same-round pairs: 60/60, 50/100, 70/70 -> median 1.0
    assert r["decode_ratio_vs_llamacpp_q8_0_by_prompt_tokens"]["40"] == pytest.approx(1.0)
    assert r["decode_ratio_vs_llamacpp_q8_0"] == pytest.approx(1.0)
    # genai round 0 failed: pairs 50/25, 70/35 -> 2.0
    assert r["decode_ratio_vs_ortgenai_int8"] == pytest.approx(2.0)
    assert set(r["ttft_ratio_vs_llamacpp"]) == {"40", "400"}
    assert r["ttft_ratio_vs_llamacpp"]["40"] == pytest.approx(2.0)  # 0.2/0.1, 0.3/0.1, 0.1/0.2
    assert r["rss_ratio_vs_llamacpp"] == pytest.approx(1.5)  # single requests: 300/200, 310/200, 290/220
    assert r["rss_all_ratio_vs_llamacpp"] == pytest.approx(350 / 250)  # after everything: 340/250, 360/250, 350/270
    assert bench.bandwidth_fraction(100e6, 50, 10) == pytest.approx(0.5)
    assert bench.bandwidth_fraction(None, 50, 10) is None


def test_build_prompts_reach_their_targets():
    encode = lambda text: text.split()  # one "token" per word  # noqa: E731
    ps = bench.build_prompts(encode, 40, 400)
    assert [p["name"] for p in ps] == ["short", "long"]
    assert len(ps[0]["ids"]) == 40 and len(ps[1]["ids"]) == 400
    assert ps[1]["ids"] == encode(ps[1]["text"])


def test_report_and_outputs(tmp_path):
    runs = {"edged": [_run(60, 0.2, 3e8, 1.5)], "llamacpp": [_run(66, 0.14, 2.2e8, 1.0)]}
    results = {
        "date": "2026-11-25T10:00:00+00:00", "machine": {"cpu_model": "Test CPU", "cores": 2, "avx2": True, "vnni": False},
        "config": {"threads": 2, "rounds": 1, "n_gen": 128, "prompt_tokens": {"short": 40, "long": 400}},
        "summary": bench.summarize(runs), "ratios": bench.ratios(runs, ["short", "long"], {"short": 40, "long": 400}),
        "bandwidth": {"threads": 2, "best_gbps": 10.0, "mean_gbps": 9.0, "method": "test"},
        "bandwidth_fraction": {"edged": 0.9}, "missing": ["onnxruntime-genai int8: set-up failed: test"],
    }
    md = bench.markdown_report(results)
    assert "| edged (int8 ONNX) |" in md and "| llama.cpp Q8_0 |" in md
    assert "not measured" in md  # genai row
    assert "set-up failed: test" in md
    assert "0.91" in md  # decode ratio 60/66
    out = tmp_path / "bench" / "results.json"
    bench.write_outputs(results, out, tmp_path / "docs", tmp_path / "no-cache")
    assert json.loads(out.read_text())["summary"]["edged"]["prompts"]["short"]["decode_tps"] == 60
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == md


def test_edged_only_run_on_tiny_model(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGED_BENCH_CACHE", str(tmp_path / "cache"))
    args = argparse.Namespace(model="tiny", rounds=1, threads=1, no_anchors=True, out=str(tmp_path / "r.json"),
                              store=str(tiny_store.root), n_gen=8, conc_n_gen=4, short_tokens=10, long_tokens=40,
                              bw_mib=8)
    res = bench.run(args)
    e = res["summary"]["edged"]
    pt = res["config"]["prompt_tokens"]
    assert 10 <= pt["short"] < 40 <= pt["long"] < 60  # cut on a word boundary at or just past the target
    for name in ("short", "long"):
        p = e["prompts"][name]
        assert p["ttft_s"] > 0 and math.isfinite(p["prefill_tps"])
    run = res["runs"]["edged"][0]
    assert run["prompts"]["long"]["ids_match"] is True  # edged tokenized the text to the ids the anchors get
    assert run["cold_start_s"] > 0 and 0 < run["peak_rss_single_bytes"] <= run["peak_rss_bytes"]
    assert [c["clients"] for c in run["concurrency"]] == [1, 4]
    assert res["bandwidth"]["best_gbps"] > 0
    assert "anchors skipped (--no-anchors)" in res["missing"]
    assert res["decode_ratio_vs_llamacpp_q8_0"] is None
    # a real `edged serve` answered the same prompts, and its peak RSS was read
    assert res["serve_rss"]["requests"] == 2 and res["serve_rss"]["peak_rss_bytes"] > 10 << 20


def test_transport_hook_calls_the_serve_function(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("edged.serve.bench_transport")

    def run_transport_bench(store, model, *, threads=None):
        calls.append((store, model, threads))
        return {"socket": {"overhead_ms_p50": 0.5, "overhead_ms_p99": 1.0, "round_trip_ms_p50": 3.0},
                "mqtt": {"overhead_ms_p50": 1.5}, "goals": {"overhead_p50_le_2ms": True}}

    fake.run_transport_bench = run_transport_bench
    monkeypatch.setitem(sys.modules, "edged.serve.bench_transport", fake)
    results: dict = {"missing": []}
    bench.transport_bench(argparse.Namespace(model="m", threads=2), "STORE", results)
    assert calls == [("STORE", "m", 2)]
    md = bench.markdown_report(results)
    assert "| socket | 0.50 | 1.00 | 3.00 |" in md and "overhead_p50_le_2ms: True" in md


def test_recompute_from_runs_matches():
    runs = {"edged": [_run(60, 0.2, 3e8, 1.5), _run(30, 0.2, 3e8, 1.5)], "llamacpp": [_run(66, 0.14, 2.2e8, 1.0)] * 2}
    res = {"config": {"prompt_tokens": {"short": 40, "long": 400}}, "runs": runs, "bandwidth": {"best_gbps": 10.0}}
    out = bench.recompute(res)
    assert out["summary"]["edged"]["prompts"]["short"]["decode_tps_best"] == 60
    assert out["decode_ratio_vs_llamacpp_q8_0"] == out["ratios"]["decode_ratio_vs_llamacpp_q8_0"]
    assert out["bandwidth_fraction"]["edged"] == pytest.approx(150e6 * 45 * 0.9 / 10e9)
