"""edged driver: loads the model through edged's public engine API and measures it.
Runs in the main venv: python bench/drivers/driver_edged.py SPEC.json"""

from __future__ import annotations

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _lookup  # noqa: E402
import _prefix  # noqa: E402
from _edged import request, token_counts  # noqa: E402
from _driver_common import (emit, load_spec, measure_stream, onnx_matmul_weight_bytes,  # noqa: E402
                            peak_rss_bytes, rss_now_bytes, warmup_tokens)

spec = load_spec()

from edged.engine.batch import BatchDecoder  # noqa: E402
from edged.engine.prefix import PrefixCache  # noqa: E402
from edged.engine.runner import EngineConfig  # noqa: E402
from edged.models.loading import load_engine  # noqa: E402
from edged.models.store import ModelStore  # noqa: E402

store = ModelStore(spec["store"]) if spec.get("store") else ModelStore()
engine = load_engine(spec["model"], config=EngineConfig(threads=spec["threads"]), store=store)
emit({"event": "ready"})
rss_loaded = rss_now_bytes()
if spec.get("lookup_only"):  # python -m bench.lookup
    emit({"event": "result", "engine": spec.get("engine", "edged"), "lookup": _lookup.edged(engine, spec)})
    sys.exit(0)
# The figures below are plain decoding, like the anchors'; the lookup section (at the end)
# measures prompt-lookup speculative decoding on and off.
engine.speculative = False


def stream(text: str, n: int, info: dict, fmt=None):
    def start():
        gen = engine.generate(request(text, n, fmt), cancel=threading.Event())
        yield from token_counts(gen)
        info.update(gen.stats)
    return start


if spec.get("warmup", True):
    p = spec["prompts"][0]
    engine.generate(request(p["text"], warmup_tokens(spec))).run()

results = {}
for p in spec["prompts"]:
    ids = engine.prepare(request(p["text"], 1)).tokens
    stats: dict = {}
    r = measure_stream(stream(p["text"], spec["n_gen"], stats), len(ids))
    r["ids_match"] = list(ids) == list(p["ids"])
    r["engine_stats"] = stats
    if stats.get("prompt_eval_duration"):
        r["prefill_tps_internal"] = stats["prompt_eval_count"] / (stats["prompt_eval_duration"] / 1e9)
    results[p["name"]] = r

peak_single = peak_rss_bytes()  # the issue's measure: loaded + single requests done
conc = []
short = spec["prompts"][0]["text"]
for c in spec.get("concurrency", []):
    # c clients' requests arrive together; the daemon's scheduler decodes them in one
    # BatchDecoder (continuous batching, batch_size >= c), which is what is measured here.
    batch = BatchDecoder(engine, slots=c)
    done: list = []
    t0 = time.perf_counter()
    for _ in range(c):
        batch.add(engine.prepare(request(short, spec["conc_n_gen"])), on_delta=lambda d: None, on_done=done.append)
    while batch.active:
        batch.step()
    wall = time.perf_counter() - t0
    tokens = sum(d["eval_count"] for d in done)
    conc.append({"clients": c, "tokens": tokens, "wall_s": wall, "aggregate_tps": tokens / wall,
                 "mode": "continuous batching (as edged serve)"})

peak_all = peak_rss_bytes()  # before the schema runs: the constraint tokenizer is not in the RSS figures

# Decode with a JSON schema enforced vs free, same prompt and token count, alternating
# (off/on, then on/off, ...) so drift in the machine's load cancels. The schema's long
# string keeps the answer going for the whole budget; the mask is computed every token.
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 100000}}, "required": ["story"]}
engine.generate(request(spec["prompts"][0]["text"], 4, SCHEMA)).run()  # builds the constraint tokenizer once
schema_pairs = []
for i in range(spec.get("schema_pairs", 3)):
    pair = {}
    for fmt in ((None, SCHEMA) if i % 2 == 0 else (SCHEMA, None)):
        info: dict = {}
        r = measure_stream(stream(spec["prompts"][0]["text"], spec["n_gen"], info, fmt), 0)
        pair["on" if fmt else "off"] = {"decode_tps": r["decode_tps"], "gen_tokens": r["gen_tokens"]}
    schema_pairs.append(pair)

prefix = None
if _prefix.wanted(spec, spec.get("engine", "edged")):
    # The daemon's way: a 4-slot BatchDecoder with a prefix cache of the default size
    # (prefix_cache.size_mb), or with none. TTFT = request -> its first token sampled.
    def make(cached):
        batch = BatchDecoder(engine, slots=4, prefix=PrefixCache(size_mb=32) if cached else None)

        def run(prompt, n):
            stats: dict = {}
            t0 = time.perf_counter()
            prepared = engine.prepare(request(prompt["text"], n))
            batch.add(prepared, on_delta=lambda d: None, on_done=stats.update)  # returns after the first token
            ttft = time.perf_counter() - t0
            while batch.active:
                batch.step()
            return ttft, {"ids_match": list(prepared.tokens) == list(prompt["ids"]),
                          **{k: stats.get(k) for k in ("prompt_eval_count", "prompt_cache_tokens")}}
        return run

    prefix = _prefix.measure(make, spec)

lookup = _lookup.edged(engine, spec) if _lookup.wanted(spec, spec.get("engine", "edged")) else None

d = engine.describe()
emit({"event": "result", "engine": "edged", "lookup": lookup, "prefix": prefix, "prompts": results, "concurrency": conc, "schema": schema_pairs,
      "rss_loaded_bytes": rss_loaded, "peak_rss_single_bytes": peak_single, "peak_rss_bytes": peak_all,
      "load_duration_s": engine.load_duration / 1e9, "describe": d,
      "weight_bytes": sum(f["size"] for name, f in engine.model.manifest["files"].items() if ".onnx" in name),
      "weight_bytes_per_token": onnx_matmul_weight_bytes(str(engine.model.file("model")))})
