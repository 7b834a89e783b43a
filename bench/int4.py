"""The 4-bit comparison: edged int4-block32 against edged int8 and llama.cpp on the
shipped Q4_1 file (and a Q4_0 requantized from it).

`make bench` runs these engines with the others. `python -m bench.int4` runs only
edged int8, edged int4 and the two llama.cpp Q4 files (alternating rounds, as the full
bench) and stores them under "int4_run" in the results file, whose other figures stay
as they were; the int4 ratios come from the full run's engines when it has them, else
from "int4_run". The functions below are pure and called from bench.report.

Goals (docs/benchmarks.md): decode >= 1.4x edged int8 and >= 1.1x llama.cpp Q4_1;
peak RSS (model loaded, single requests done) <= llama.cpp Q4_1's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from bench.report import LABELS, fmt, median, paired_ratio, ratio, summarize

GOALS = {"int4_decode_ratio_vs_int8": (">=", 1.4), "int4_decode_ratio_vs_llamacpp_q4_1": (">=", 1.1),
         "int4_rss_ratio_vs_llamacpp_q4_1": ("<=", 1.0)}
HEADLINE = tuple(GOALS)
ENGINE = "edged_int4"


def source_runs(results: dict) -> tuple[dict, dict, str]:
    """(runs, prompt token counts, where) of the run the int4 figures come from."""
    runs = results.get("runs") or {}
    if any("error" not in r for r in runs.get(ENGINE, [])):
        return runs, results.get("config", {}).get("prompt_tokens", {}), "make bench"
    apart = results.get("int4_run") or {}
    return apart.get("runs") or {}, apart.get("config", {}).get("prompt_tokens", {}), "python -m bench.int4"


def derive(results: dict) -> None:
    """int4_ratios, the headline int4 keys and (for a run apart) its summary, in place."""
    runs, pt, where = source_runs(results)
    results["int4_ratios"] = int4_ratios(runs, list(pt) or ["short", "long"], pt)
    if results["int4_ratios"]:
        results["int4_ratios"]["measured_by"] = where
    summary = summarize(runs)
    if where != "make bench" and "int4_run" in results:
        results["int4_run"]["summary"] = summary
    r = results["int4_ratios"]
    for other, suffix in (("edged", "int8"), ("llamacpp_q4_1", "llamacpp_q4_1"), ("llamacpp_q4_0", "llamacpp_q4_0")):
        if r and ENGINE in summary and other in summary:
            # each engine's least-contended round: on a shared machine llama.cpp's OpenMP threads
            # lose most when a core is taken, which paired medians do not cancel
            r[f"int4_best_round_decode_ratio_vs_{suffix}_by_prompt_tokens"] = {
                str(pt.get(n, n)): ratio(summary[ENGINE]["prompts"][n].get("decode_tps_best"),
                                         summary[other]["prompts"].get(n, {}).get("decode_tps_best"))
                for n in summary[ENGINE]["prompts"]}
    for k in HEADLINE:
        results[k] = results["int4_ratios"].get(k)


def int4_ratios(runs: dict, prompt_names, token_counts: dict) -> dict:
    """edged int4 ÷ {edged int8, llama.cpp Q4_1, llama.cpp Q4_0}: decode per prompt length
    and their median, TTFT, peak RSS (single requests done), each a median of same-round pairs."""
    out: dict = {}
    if not any("error" not in r for r in runs.get(ENGINE, [])):
        return out
    for other, suffix in (("edged", "int8"), ("llamacpp_q4_1", "llamacpp_q4_1"), ("llamacpp_q4_0", "llamacpp_q4_0")):
        if not any("error" not in r for r in runs.get(other, [])):
            continue
        by = {str(token_counts.get(n, n)): paired_ratio(runs, ENGINE, other, lambda r, n=n: r["prompts"][n]["decode_tps"])
              for n in prompt_names}
        out[f"int4_decode_ratio_vs_{suffix}"] = median(by.values())
        out[f"int4_decode_ratio_vs_{suffix}_by_prompt_tokens"] = by
        out[f"int4_ttft_ratio_vs_{suffix}"] = {
            str(token_counts.get(n, n)): paired_ratio(runs, ENGINE, other, lambda r, n=n: r["prompts"][n]["ttft_s"])
            for n in prompt_names}
        out[f"int4_rss_ratio_vs_{suffix}"] = paired_ratio(
            runs, ENGINE, other, lambda r: r.get("peak_rss_single_bytes") or r["peak_rss_bytes"])
    return out


def goals_met(results: dict) -> dict:
    """key -> (met, figures): a decode goal counts as met only when both the paired median
    and the fastest rounds' ratio meet it (on a busy machine the two can disagree)."""
    met = {}
    r = results.get("int4_ratios") or {}
    for k, (op, bound) in GOALS.items():
        v = results.get(k)
        vals = [v]
        best = r.get(k.replace("int4_decode_ratio", "int4_best_round_decode_ratio") + "_by_prompt_tokens")
        if "decode" in k and best:
            vals.append(median(best.values()))
        ok = None if any(x is None for x in vals) else all(x >= bound if op == ">=" else x <= bound for x in vals)
        figures = fmt(v, 2) if len(vals) == 1 else f"paired {fmt(vals[0], 2)}, fastest rounds {fmt(vals[1], 2)}"
        met[k] = (ok, figures)
    return met


def markdown(results: dict) -> list[str]:
    """The 4-bit section of docs/benchmarks.md (empty when int4 was not measured)."""
    r = results.get("int4_ratios") or {}
    if not r:
        return []
    apart = r.get("measured_by") != "make bench"
    src = results.get("int4_run", {}) if apart else results
    s = src.get("summary", {})
    pt = src.get("config", {}).get("prompt_tokens", {})
    names = [n for n in ("short", "long") if n in pt]
    lines = ["", "## 4-bit: edged int4-block32 vs edged int8 and llama.cpp Q4_1 / Q4_0", "",
             "edged int4 is `edged pull smollm2-135m --scheme int4-block32`: the Q4_1 file's own blocks in "
             "MatMulNBits (4-bit layers, the Q8_0 LM head at 8 bits), gated against fp32 like int8 "
             "([models.md](models.md)). llama.cpp runs the shipped Q4_1 file itself and a Q4_0 that llama.cpp "
             "requantized from it. Ratios are edged int4 ÷ the other engine, median of same-round pairs"
             + (f"; measured apart by `python -m bench.int4` on {src.get('date', '?')}, {src.get('config', {}).get('rounds')} "
                "alternating rounds of edged int8, edged int4, llama.cpp Q4_1 and Q4_0 (the table above is "
                "another run)." if apart else "."), "",
             "| ratio | vs edged int8 | vs llama.cpp Q4_1 | vs llama.cpp Q4_0 | goal |", "|---|---|---|---|---|"]
    others = ("int8", "llamacpp_q4_1", "llamacpp_q4_0")

    def per_prompt(label: str, key: str) -> None:
        """One row per prompt length: `key` names the by-prompt-tokens ratio for `x`."""
        for n in names:
            k = str(pt.get(n, n))
            lines.append(f"| {label.format(k=k)} | " + " | ".join(
                fmt((r.get(key.format(x=x)) or {}).get(k), 2) for x in others) + " | |")

    per_prompt("decode tok/s, {k}-token prompt", "int4_decode_ratio_vs_{x}_by_prompt_tokens")
    lines.append("| **decode, median of the prompt lengths** | " + " | ".join(
        f"**{fmt(r.get(f'int4_decode_ratio_vs_{x}'), 2)}**" for x in others)
        + " | ≥ 1.4 vs int8, ≥ 1.1 vs Q4_1 |")
    per_prompt("TTFT, {k}-token prompt", "int4_ttft_ratio_vs_{x}")
    per_prompt("decode, each engine's fastest round, {k}-token prompt", "int4_best_round_decode_ratio_vs_{x}_by_prompt_tokens")
    lines.append("| **peak RSS, model loaded + single requests done** | " + " | ".join(
        f"**{fmt(r.get(f'int4_rss_ratio_vs_{x}'), 2)}**" for x in others)
        + " | ≤ 1.0 vs Q4_1 |")
    met = goals_met(results)
    loads = [x.get("loadavg_1m_before") for rs in (src.get("runs") or {}).values() for x in rs]
    if apart and median(loads) is not None:
        lines += ["", f"Machine load before each run of this comparison: median {median(loads):.1f} (1-minute load "
                      "average, 2 cores): other jobs competed; where the paired median and the fastest round "
                      "disagree, the fastest round is the closer to an idle machine."]
    lines += ["", "Goals: " + ", ".join(f"`{k}` {fig}: {'met' if ok else 'missed' if ok is not None else 'not measured'}"
                                         for k, (ok, fig) in met.items()) + "."]
    if apart and s:
        lines += ["", "| engine (this run) | " + " | ".join(f"decode after {pt.get(n)} (tok/s)" for n in names)
                  + " | peak RSS, single requests (MB) |", "|---" * (2 + len(names)) + "|"]
        for e in ("edged", ENGINE, "llamacpp_q4_1", "llamacpp_q4_0"):
            if e in s:
                lines.append(f"| {LABELS.get(e, e)} | " + " | ".join(
                    fmt(s[e]["prompts"].get(n, {}).get("decode_tps"), 1) for n in names)
                    + f" | {fmt(s[e].get('peak_rss_single_mb'), 0)} |")
    wb = [(e, (s.get(e) or {}).get("weight_bytes_per_token")) for e in ("edged", ENGINE, "llamacpp_q4_1", "llamacpp_q4_0")]
    if all(b for _, b in wb):
        lines += ["", "Weight bytes read per decoded token: " + ", ".join(
            f"{e} {b / 1e6:.0f} MB" for e, b in wb) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    from bench import cache_dir
    from bench.harness import N_GEN, run_rounds, set_up, write_outputs
    from bench.report import derive as derive_all

    p = argparse.ArgumentParser(prog="python -m bench.int4", description="edged int8 and int4 beside llama.cpp "
                                "Q4_1 and Q4_0 only, stored under int4_run in the results file (run from the "
                                "repository root)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-gen", type=int, default=N_GEN)
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    plan = set_up(args.model, threads=args.threads, rounds=args.rounds, n_gen=args.n_gen,
                  anchor_names=(ENGINE, "llamacpp_q4_1", "llamacpp_q4_0"))
    runs = run_rounds(plan)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}, "config": {}}
    results["int4_run"] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {"threads": plan.threads, "rounds": plan.rounds, "n_gen": plan.n_gen,
                   "prompt_tokens": {q["name"]: len(q["ids"]) for q in plan.prompts}, "order": list(plan.commands)},
        "machine": plan.machine, "missing": plan.missing, "runs": runs,
    }
    derive_all(results)
    write_outputs(results, out, None if args.no_docs else Path("docs"), cache_dir())
    print(json.dumps({k: results.get(k) for k in HEADLINE}))
    print(json.dumps({k: v for k, v in results["int4_ratios"].items() if not isinstance(v, dict)}, indent=1))
    return 0 if results["int4_ratios"] else 1


if __name__ == "__main__":
    sys.exit(main())
