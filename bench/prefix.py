"""Prompt prefix cache: TTFT of a request that shares a ~300-token system prompt with an
earlier one, cached and uncached, edged and llama.cpp (its own prompt cache,
llama-cpp-python's LlamaRAMCache) in the same run.

The drivers measure (bench/drivers/_prefix.py); this module builds the prompts for
the spec, derives the ratios and writes the report's paragraph. Pure functions.
"""

from __future__ import annotations

from bench.report import fmt, median, ratio

ENGINES = ("edged", "llamacpp")  # the drivers that run it
TARGET = 300  # tokens of the shared system prompt
HEADLINE = ("prefix_cache_ttft_ratio", "prefix_cache_ttft_ratio_vs_llamacpp_cached")

# Raw text (no chat template), so every engine gets the very same token ids.
SYSTEM = (
    "You are the monitoring assistant of a greenhouse controller running on a small board. Every message "
    "you receive is one reading from one sensor, sent over MQTT by a device in the greenhouse. Readings give "
    "the sensor's name, the air temperature in degrees Celsius, the relative humidity in percent, the soil "
    "moisture on a scale from 0 (dry) to 100 (saturated), and the state of the vents and doors nearby. Reply "
    "with one short sentence a gardener can act on. Rules: above 30 degrees, open the vents; below 12 degrees, "
    "close the vents and the doors; above 85 percent humidity with the vents closed, warn about mould; soil "
    "moisture under 35 means the bed needs water, but never water the same bed twice within an hour; a reading "
    "that is physically impossible (humidity above 100, temperature above 60 or below minus 30) means the "
    "sensor is faulty and must be checked, and no other advice applies. If nothing needs doing, say that all is "
    "well and name the sensor. Do not repeat the reading back, do not explain the rules, do not greet, and "
    "never invent readings that were not sent. Write plain text without lists, headings or emphasis. The "
    "gardeners read the answers on a small display next to the door, so keep every answer under twenty words. "
    "When two rules apply, give the one about safety first: faulty sensors, then heat, then cold, then mould, "
    "then water. The greenhouse grows tomatoes, peppers, basil and lettuce in four beds along the south wall."
)
READING_A = "\n\nReading: sensor bed-1, 31.5 degrees, humidity 62 percent, soil 48, vents closed, door closed.\nAnswer:"
READING_B = "\n\nReading: sensor bed-3, 9.0 degrees, humidity 88 percent, soil 30, vents open, door open.\nAnswer:"
OTHER = (
    "The village of Alder Reach sat where the river widened before meeting the sea. For three hundred years its "
    "people had fished the estuary, mended nets on the stone quay, and traded salt fish for grain with the "
    "farmers who came down from the hills each autumn. "
)


def fit(encode, base: str, target: int) -> str:
    """The fewest words of `base` (repeated as needed) reaching `target` tokens."""
    words = base.split()
    while len(encode(" ".join(words))) < target:
        words = words + base.split()
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(" ".join(words[:mid]))) >= target:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(words[:lo])


def build(encode, target: int = TARGET, *, repeats: int = 3, n_gen: int = 16) -> dict:
    """spec["prefix"] for the drivers: requests A and B share a system prompt of about
    `target` tokens; X is unrelated and about as long."""
    system = fit(encode, SYSTEM, target)
    prompts = {}
    for name, text in (("a", system + READING_A), ("b", system + READING_B), ("x", fit(encode, OTHER, target) + READING_A)):
        prompts[name] = {"text": text, "ids": list(encode(text))}
    shared = 0
    for u, v in zip(prompts["a"]["ids"], prompts["b"]["ids"]):
        if u != v:
            break
        shared += 1
    return {**prompts, "shared_tokens": shared, "system_tokens": len(encode(system)), "n_gen": n_gen,
            "repeats": repeats, "engines": list(ENGINES)}


def _get(run: dict, key: str):
    return (run.get("prefix") or {}).get(key) if "error" not in run else None


def _fastest(rs: list[dict], key: str) -> float | None:
    """The fastest `key` try of all rounds: the least contended one on a shared machine."""
    vals = [t for r in rs if "error" not in r for t in ((r.get("prefix") or {}).get(key) or [])]
    return min(vals) if vals else None


def derive(results: dict) -> None:
    """results["prefix_cache"]: medians per engine and the ratios (paired by round:
    the engines ran back to back); the headline ratios at the top level too."""
    runs = results.get("runs") or {}
    out: dict = {}
    for eng in ENGINES:
        rs = runs.get(eng) or []
        if any(_get(r, "cached_ttft_s") is not None for r in rs):
            out[eng] = {k: median(_get(r, f"{k}_ttft_s") for r in rs) for k in ("uncached", "cached", "after_other")}
            out[eng]["fastest"] = {k: _fastest(rs, k) for k in ("uncached", "cached", "after_other")}
            first = next(r["prefix"] for r in rs if _get(r, "cached_ttft_s") is not None)
            out[eng]["prompt_tokens"] = first.get("prompt_tokens")
            out[eng]["shared_tokens"] = first.get("shared_tokens")
            if eng == "edged":
                out[eng]["prompt_cache_tokens"] = ((first.get("info") or {}).get("cached") or {}).get("prompt_cache_tokens")
    e, lc = runs.get("edged") or [], runs.get("llamacpp") or []

    def own(rs, key):
        return median(ratio(_get(r, f"{key}_ttft_s"), _get(r, "uncached_ttft_s")) for r in rs)

    def paired(key):
        return median(ratio(_get(x, f"{key}_ttft_s"), _get(y, f"{key}_ttft_s")) for x, y in zip(e, lc))

    r = {
        "prefix_cache_ttft_ratio": own(e, "cached"),
        "prefix_cache_ttft_ratio_after_other": own(e, "after_other"),
        "prefix_cache_ttft_ratio_vs_llamacpp_cached": paired("cached"),
        "prefix_cache_ttft_ratio_vs_llamacpp_after_other": paired("after_other"),
        "llamacpp_prefix_cache_ttft_ratio": own(lc, "cached"),
        "llamacpp_prefix_cache_ttft_ratio_after_other": own(lc, "after_other"),
        "prefix_cache_ttft_ratio_best": ratio(_fastest(e, "cached"), _fastest(e, "uncached")),
        "prefix_cache_ttft_ratio_vs_llamacpp_cached_best": ratio(_fastest(e, "cached"), _fastest(lc, "cached")),
    }
    if out or any(v is not None for v in r.values()):
        results["prefix_cache"] = {"engines": out, "ratios": r,
                                   "goals": {"prefix_cache_ttft_ratio": "<= 0.15",
                                             "prefix_cache_ttft_ratio_vs_llamacpp_cached": "<= 1"}}
    for k in HEADLINE:
        results[k] = r[k]


LABELS = {"edged": "edged (int8 ONNX)", "llamacpp": "llama.cpp Q8_0 + LlamaRAMCache"}


def markdown(results: dict) -> list[str]:
    pc = results.get("prefix_cache")
    if not pc:
        return []
    eng, r = pc.get("engines") or {}, pc.get("ratios") or {}
    shared = next((v.get("shared_tokens") for v in eng.values() if v.get("shared_tokens")), None)
    total = next((v.get("prompt_tokens") for v in eng.values() if v.get("prompt_tokens")), None)
    lines = ["", f"Prompt prefix cache: TTFT of a {fmt(total)}-token request whose first {fmt(shared)} tokens (a system "
                 "prompt) an earlier request had too (`bench/prefix.py`; median over rounds of the median of "
                 "3 tries, each from a fresh state):", "",
             "| engine | uncached (s) | after the earlier request (s) | with an unrelated request between (s) |",
             "|---|---|---|---|"]
    for name in ENGINES:
        v = eng.get(name)
        if v:
            lines.append(f"| {LABELS[name]} | {fmt(v.get('uncached'), 3)} | {fmt(v.get('cached'), 3)} | "
                         f"{fmt(v.get('after_other'), 3)} |")
    lines += ["", f"edged cached ÷ uncached: {fmt(r.get('prefix_cache_ttft_ratio'), 3)} (goal ≤ 0.15; "
                  f"{fmt(r.get('prefix_cache_ttft_ratio_after_other'), 3)} with a request between); edged cached ÷ "
                  f"llama.cpp cached: {fmt(r.get('prefix_cache_ttft_ratio_vs_llamacpp_cached'), 2)} (goal ≤ 1; "
                  f"{fmt(r.get('prefix_cache_ttft_ratio_vs_llamacpp_after_other'), 2)} with a request between, where "
                  "llama.cpp restores the prefix from its RAM cache). llama.cpp's own cached ÷ uncached: "
                  f"{fmt(r.get('llamacpp_prefix_cache_ttft_ratio'), 3)}. Ratios are medians of same-round pairs. "
                  "llama.cpp's OpenMP threads suffer most when other work takes a core; the fastest tries of "
                  f"the run (the least contended): edged cached ÷ uncached {fmt(r.get('prefix_cache_ttft_ratio_best'), 3)}, "
                  f"edged cached ÷ llama.cpp cached {fmt(r.get('prefix_cache_ttft_ratio_vs_llamacpp_cached_best'), 2)}."]
    return lines
