"""The prefix-cache measurement, shared by the drivers (each runs it on its own engine).

A request B shares a system prompt of about 300 tokens with an earlier request A.
Its time to first token is measured three ways, each from a fresh state:

- uncached: B alone, with no cache at all (the whole prompt is prefilled);
- cached: A, then B (B finds A's prompt in the engine's own cache);
- after_other: A, then an unrelated request X, then B (B's prefix is no longer the
  last thing the engine ran: llama.cpp must restore it from its RAM cache, edged
  finds it in the slot A left).

spec["prefix"]: {"a": {"text", "ids"}, "b": {...}, "x": {...}, "shared_tokens": int,
"n_gen": int, "repeats": int, "engines": [names that run it]}.
"""

from __future__ import annotations

import statistics
from typing import Callable

# make(cached: bool) -> run(prompt: dict, n: int) -> (ttft_s, info dict); a fresh state each call
Maker = Callable[[bool], Callable[[dict, int], tuple[float, dict]]]


def wanted(spec: dict, engine: str) -> bool:
    p = spec.get("prefix")
    return bool(p) and engine in p.get("engines", ())


def measure(make: Maker, spec: dict) -> dict:
    p = spec["prefix"]
    n = p.get("n_gen", 16)
    out: dict = {"uncached": [], "cached": [], "after_other": [], "info": {}}
    for _ in range(p.get("repeats", 3)):
        run = make(False)
        t, info = run(p["b"], n)
        out["uncached"].append(t)
        out["info"]["uncached"] = info
        run = make(True)
        run(p["a"], n)
        t, info = run(p["b"], n)
        out["cached"].append(t)
        out["info"]["cached"] = info
        run = make(True)
        run(p["a"], n)
        run(p["x"], n)
        t, info = run(p["b"], n)
        out["after_other"].append(t)
        out["info"]["after_other"] = info
    for k in ("uncached", "cached", "after_other"):
        out[f"{k}_ttft_s"] = statistics.median(out[k])
    out["prompt_tokens"] = len(p["b"]["ids"])
    out["shared_tokens"] = p.get("shared_tokens")
    return out
