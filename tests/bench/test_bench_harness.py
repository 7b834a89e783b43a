"""The benchmark (`python -m bench`): its pure functions, an edged-only run on the tiny
model, and the transport bench against a real daemon and mosquitto.
No speed is asserted: only that the numbers exist, are consistent and are written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench import ROOT, harness, report


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
    assert report.median([3, None, 1, float("nan"), 2]) == 2
    assert report.median([]) is None
    assert report.ratio(6, 3) == 2
    assert report.ratio(1, 0) is None and report.ratio(None, 1) is None and report.ratio(float("nan"), 1) is None


def test_summarize_and_paired_ratios():
    runs = {
        "edged": [_run(60, 0.2, 300_000_000, 1.5), _run(50, 0.3, 310_000_000, 1.7), _run(70, 0.1, 290_000_000, 1.4)],
        "llamacpp": [_run(60, 0.1, 200_000_000, 1.0), _run(100, 0.1, 200_000_000, 1.0), _run(70, 0.2, 220_000_000, 1.2)],
        "ortgenai": [{"error": "driver exited 1"}, _run(25, 0.3, 400_000_000, 2.0), _run(35, 0.1, 400_000_000, 2.0)],
    }
    s = report.summarize(runs)
    assert s["edged"]["prompts"]["short"]["decode_tps"] == 60
    assert s["edged"]["prompts"]["short"]["ttft_s"] == 0.2
    assert s["edged"]["cold_start_s"] == 1.5
    assert s["edged"]["peak_rss_single_mb"] == 300 and s["edged"]["peak_rss_mb"] == 350
    assert s["edged"]["concurrency"]["4"] == {"aggregate_tps": 10.0, "mode": "serialised"}
    assert s["ortgenai"]["rounds"] == 2  # the failed run is left out
    r = report.ratios(runs, ["short", "long"], {"short": 40, "long": 400})
    # same-round pairs: 60/60, 50/100, 70/70 -> median 1.0
    assert r["decode_ratio_vs_llamacpp_q8_0_by_prompt_tokens"]["40"] == pytest.approx(1.0)
    assert r["decode_ratio_vs_llamacpp_q8_0"] == pytest.approx(1.0)
    # genai round 0 failed: pairs 50/25, 70/35 -> 2.0
    assert r["decode_ratio_vs_ortgenai_int8"] == pytest.approx(2.0)
    assert set(r["ttft_ratio_vs_llamacpp"]) == {"40", "400"}
    assert r["ttft_ratio_vs_llamacpp"]["40"] == pytest.approx(2.0)  # 0.2/0.1, 0.3/0.1, 0.1/0.2
    assert r["rss_ratio_vs_llamacpp"] == pytest.approx(1.5)  # single requests: 300/200, 310/200, 290/220
    assert r["rss_all_ratio_vs_llamacpp"] == pytest.approx(350 / 250)  # after everything: 340/250, 360/250, 350/270
    assert report.bandwidth_fraction(100e6, 50, 10) == pytest.approx(0.5)
    assert report.bandwidth_fraction(None, 50, 10) is None


def test_build_prompts_reach_their_targets():
    encode = lambda text: text.split()  # one "token" per word  # noqa: E731
    ps = harness.build_prompts(encode, 40, 400)
    assert [p["name"] for p in ps] == ["short", "long"]
    assert len(ps[0]["ids"]) == 40 and len(ps[1]["ids"]) == 400
    assert ps[1]["ids"] == encode(ps[1]["text"])


def test_report_and_outputs(tmp_path):
    runs = {"edged": [_run(60, 0.2, 3e8, 1.5)], "llamacpp": [_run(66, 0.14, 2.2e8, 1.0)]}
    results = {
        "date": "2026-11-25T10:00:00+00:00", "machine": {"cpu_model": "Test CPU", "cores": 2, "avx2": True, "vnni": False},
        "config": {"threads": 2, "rounds": 1, "n_gen": 128, "prompt_tokens": {"short": 40, "long": 400}},
        "summary": report.summarize(runs), "ratios": report.ratios(runs, ["short", "long"], {"short": 40, "long": 400}),
        "bandwidth": {"threads": 2, "best_gbps": 10.0, "mean_gbps": 9.0, "method": "test"},
        "bandwidth_fraction": {"edged": 0.9}, "missing": ["onnxruntime-genai int8: set-up failed: test"],
    }
    md = report.markdown_report(results)
    assert "| edged (int8 ONNX) |" in md and "| llama.cpp Q8_0 |" in md
    assert "not measured" in md  # genai row
    assert "set-up failed: test" in md
    assert "0.91" in md  # decode ratio 60/66
    out = tmp_path / "bench" / "results.json"
    harness.write_outputs(results, out, tmp_path / "docs", tmp_path / "no-cache")
    assert json.loads(out.read_text())["summary"]["edged"]["prompts"]["short"]["decode_tps"] == 60
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == md


def test_edged_only_run_on_tiny_model(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGED_BENCH_CACHE", str(tmp_path / "cache"))
    plan = harness.set_up("tiny", threads=1, rounds=1, anchor_names=(), store_root=tiny_store.root, n_gen=8,
                          conc_n_gen=4, short_tokens=10, long_tokens=40, bw_mib=8)
    res = harness.summarize_rounds(plan, harness.run_rounds(plan), harness.serve_rss(plan))
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
    # prefix cache: B found the prompt A left, and the TTFT ratio exists
    assert run["prefix"]["info"]["cached"]["prompt_cache_tokens"] >= run["prefix"]["shared_tokens"] - 2
    assert res["prefix_cache_ttft_ratio"] > 0
    assert len(run["schema"]) == 3 and res["schema_decode_ratio"] > 0  # decode with a JSON schema on vs off
    assert res["bandwidth"]["best_gbps"] > 0
    assert "anchors skipped (--no-anchors)" in res["missing"]
    assert res["decode_ratio_vs_llamacpp_q8_0"] is None
    # a real `edged serve` answered the same prompts, and its peak RSS was read
    assert res["serve_rss"]["requests"] == 2 and res["serve_rss"]["peak_rss_bytes"] > 10 << 20


def test_transport_bench_against_a_real_daemon(tiny_store):
    from bench.transport import run_transport_bench

    t = run_transport_bench(tiny_store, "tiny", threads=1, requests=10, per_client=2, clients=(1, 4))
    for name in ("socket", "mqtt", "http"):
        assert t[name]["requests"] == 10 and t[name]["errors"] == 0
        assert t[name]["round_trip_ms_p50"] > 0 and t[name]["overhead_ms_p50"] is not None
        assert [c["clients"] for c in t["concurrency"][name]] == [1, 4]
        assert all(c["lost"] == 0 and c["duplicated"] == 0 and c["errors"] == 0 for c in t["concurrency"][name])
    assert t["goals"]["no_lost_or_duplicated"] is True
    md = report.markdown_report({"transport": t})
    assert "| socket | " in md and "| mqtt | " in md and "| http | " in md and "no_lost_or_duplicated: True" in md


def test_command_line_has_one_parser_and_runs_from_the_repo_root():
    r = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for option in ("--model", "--rounds", "--threads", "--no-anchors", "--out", "--transport", "--report-only"):
        assert option in r.stdout
    assert "(default 7)" in r.stdout  # --rounds


def test_recompute_from_runs_matches():
    runs = {"edged": [_run(60, 0.2, 3e8, 1.5), _run(30, 0.2, 3e8, 1.5)], "llamacpp": [_run(66, 0.14, 2.2e8, 1.0)] * 2}
    res = {"config": {"prompt_tokens": {"short": 40, "long": 400}}, "runs": runs, "bandwidth": {"best_gbps": 10.0}}
    out = report.derive(res)
    assert out["summary"]["edged"]["prompts"]["short"]["decode_tps_best"] == 60
    assert out["decode_ratio_vs_llamacpp_q8_0"] == out["ratios"]["decode_ratio_vs_llamacpp_q8_0"]
    assert out["bandwidth_fraction"]["edged"] == pytest.approx(150e6 * 45 * 0.9 / 10e9)
