"""The 4-bit comparison: edged int4-block32 against edged int8 and llama.cpp on the
shipped Q4_1 file (and a Q4_0 requantized from it). Pure functions over the runs,
called from bench.report.

Goals (docs/benchmarks.md): decode >= 1.4x edged int8 and >= 1.1x llama.cpp Q4_1;
peak RSS (model loaded, single requests done) <= llama.cpp Q4_1's.
"""

from __future__ import annotations

from bench.report import fmt, median, paired_ratio

GOALS = {"int4_decode_ratio_vs_int8": (">=", 1.4), "int4_decode_ratio_vs_llamacpp_q4_1": (">=", 1.1),
         "int4_rss_ratio_vs_llamacpp_q4_1": ("<=", 1.0)}
HEADLINE = tuple(GOALS)
ENGINE = "edged_int4"


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
    met = {}
    for k, (op, bound) in GOALS.items():
        v = results.get(k)
        met[k] = None if v is None else (v >= bound if op == ">=" else v <= bound)
    return met


def markdown(results: dict) -> list[str]:
    """The 4-bit section of docs/benchmarks.md (empty when int4 was not measured)."""
    r = results.get("int4_ratios") or {}
    if not r:
        return []
    s = results.get("summary", {})
    pt = results.get("config", {}).get("prompt_tokens", {})
    names = [n for n in ("short", "long") if n in pt]
    lines = ["", "## 4-bit: edged int4-block32 vs edged int8 and llama.cpp Q4_1 / Q4_0", "",
             "edged int4 is `edged pull smollm2-135m --scheme int4-block32`: the Q4_1 file's own blocks in "
             "MatMulNBits (4-bit layers, the Q8_0 LM head at 8 bits), gated against fp32 like int8 "
             "([models.md](models.md)). llama.cpp runs the shipped Q4_1 file itself and a Q4_0 that llama.cpp "
             "requantized from it. Ratios are edged int4 ÷ the other engine, median of same-round pairs.", "",
             "| ratio | vs edged int8 | vs llama.cpp Q4_1 | vs llama.cpp Q4_0 | goal |", "|---|---|---|---|---|"]
    for n in names:
        k = str(pt.get(n, n))
        lines.append(f"| decode tok/s, {k}-token prompt | " + " | ".join(
            fmt((r.get(f"int4_decode_ratio_vs_{x}_by_prompt_tokens") or {}).get(k), 2)
            for x in ("int8", "llamacpp_q4_1", "llamacpp_q4_0")) + " | |")
    lines.append("| **decode, median of the prompt lengths** | " + " | ".join(
        f"**{fmt(r.get(f'int4_decode_ratio_vs_{x}'), 2)}**" for x in ("int8", "llamacpp_q4_1", "llamacpp_q4_0"))
        + " | ≥ 1.4 vs int8, ≥ 1.1 vs Q4_1 |")
    for n in names:
        k = str(pt.get(n, n))
        lines.append(f"| TTFT, {k}-token prompt | " + " | ".join(
            fmt((r.get(f"int4_ttft_ratio_vs_{x}") or {}).get(k), 2) for x in ("int8", "llamacpp_q4_1", "llamacpp_q4_0"))
            + " | |")
    lines.append("| **peak RSS, model loaded + single requests done** | " + " | ".join(
        f"**{fmt(r.get(f'int4_rss_ratio_vs_{x}'), 2)}**" for x in ("int8", "llamacpp_q4_1", "llamacpp_q4_0"))
        + " | ≤ 1.0 vs Q4_1 |")
    met = goals_met(results)
    lines += ["", "Goals: " + ", ".join(f"`{k}` {fmt(results.get(k), 2)}: "
                                         f"{'met' if v else 'missed' if v is not None else 'not measured'}"
                                         for k, v in met.items()) + "."]
    wb = [(e, (s.get(e) or {}).get("weight_bytes_per_token")) for e in ("edged", ENGINE, "llamacpp_q4_1", "llamacpp_q4_0")]
    if all(b for _, b in wb):
        lines += ["", "Weight bytes read per decoded token: " + ", ".join(
            f"{e} {b / 1e6:.0f} MB" for e, b in wb) + "."]
    return lines
