"""Prompt prefix cache: the same greedy answers as without it, fewer prompt tokens
evaluated, within its memory budget, and given back under memory pressure."""

from __future__ import annotations

import resource

import numpy as np
import pytest
from helpers import DaemonThread, daemon_config

from edged.engine.batch import BatchDecoder
from edged.engine.prefix import PrefixCache, common_prefix, system_prefix
from edged.engine.request import GenerateRequest
from edged.engine.runner import EngineConfig

# The tiny model's context is 256 tokens of a 400-token vocabulary: a short system prompt.
TINY_SYSTEM = "You watch a greenhouse. Open the vents above 30 degrees; water when soil is under 35."
SYSTEM = (
    "You are the assistant of a small greenhouse controller. Answer in one short sentence. "
    "Temperatures are in degrees Celsius, humidity in percent, soil moisture from 0 (dry) to 100 (wet). "
    "When a reading is outside its range, say which one and what to do: open the vents above 30 degrees, "
    "close them below 12, water when soil moisture is under 35, and never water twice within an hour. "
)


def req(engine, prompt=None, *, system=TINY_SYSTEM, messages=None, n=16, raw=False):
    body = {"options": {"temperature": 0, "num_predict": n}}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    if system is not None and not raw:
        body["system"] = system
    if raw:
        body["raw"] = True
    return engine.prepare(GenerateRequest.from_dict(body))


def run(batch, prepared):
    """One request through the batch, alone: (text, final stats)."""
    out, stats = [], {}
    batch.add(prepared, on_delta=out.append, on_done=stats.update)
    while batch.active:
        batch.step()
    return "".join(out), stats


def cold(engine, prepared):
    """The same request without any cache (a fresh single sequence)."""
    from edged.engine.engine import Generation

    g = Generation(engine, prepared, None)
    return g.run(), g.stats


@pytest.fixture(scope="module")
def chunky_engine(tiny_store):
    """The tiny model prefilling 5 tokens at a time: prompts cross many chunk boundaries."""
    from edged.models.loading import load_engine

    return load_engine("tiny", store=tiny_store, config=EngineConfig(prefill_chunk=5))


@pytest.fixture
def seen_logits(monkeypatch):
    """Every logits vector a request's decoder is given, in order."""
    from edged.engine.engine import Decoder

    seen: list[np.ndarray] = []
    advance = Decoder.advance
    monkeypatch.setattr(Decoder, "advance", lambda self, logits, *a: (seen.append(np.array(logits)), advance(self, logits, *a))[1])
    return seen


def test_greedy_output_is_the_same_with_and_without_the_cache(tiny_engine, chunky_engine, seen_logits):
    for engine in (tiny_engine, chunky_engine):
        cache = PrefixCache(size_mb=64)
        batch = BatchDecoder(engine, slots=2, capacity=512, prefix=cache)
        uncached = BatchDecoder(engine, slots=2, capacity=512)
        first = req(engine, "Reading: 31.5 degrees, humidity 80, soil 40.")
        prompts = [
            first,
            req(engine, "Reading: 11 degrees, humidity 40, soil 20."),  # shares the system prompt
            first,  # the very same prompt again
            req(engine, "Reading: 31.5 degrees, humidity 80, soil 40. Also: the door is open."),  # extends it
            req(engine, "Reading: 31.5 degrees"),  # a prefix of an earlier prompt
            req(engine, messages=[{"role": "user", "content": "Reading: 25 degrees."},
                                  {"role": "assistant", "content": "All fine."},
                                  {"role": "user", "content": "And now 33?"}]),
            req(engine, "Paris is", system=None, raw=True),  # shares nothing
        ]
        # prompts ending on every position around a chunk boundary (5): lone last tokens
        base = req(engine, "one two three four five six seven eight nine ten eleven twelve", raw=True, n=6).tokens
        prompts += [engine.prepare(GenerateRequest.from_dict(
            {"prompt": engine.tokenizer.decode(base[:k]), "raw": True, "options": {"temperature": 0, "num_predict": 6}}))
            for k in (9, 10, 11, 12)]
        shared = len(system_prefix(engine, TINY_SYSTEM))
        reused = 0
        for p in prompts:
            seen_logits.clear()
            expected, cold_stats = run(uncached, p)
            cold_logits = list(seen_logits)
            seen_logits.clear()
            text, stats = run(batch, p)
            assert text == expected, engine.tokenizer.decode(p.tokens)
            assert stats["eval_count"] == cold_stats["eval_count"]
            # not only the same tokens: the very same numbers, so no prompt can differ
            assert len(seen_logits) == len(cold_logits)
            assert all(np.array_equal(a, b) for a, b in zip(seen_logits, cold_logits)), engine.tokenizer.decode(p.tokens)
            assert stats["prompt_eval_count"] + stats["prompt_cache_tokens"] == len(p.tokens)
            assert stats["prompt_eval_count"] >= 1
            reused += stats["prompt_cache_tokens"]
        assert reused > 4 * shared  # the shared system prompt came from the cache


def test_a_kept_prompt_survives_other_requests_decoding_and_the_cache_growing_and_shrinking(tiny_engine, monkeypatch):
    from edged.engine import batch as batch_mod

    monkeypatch.setattr(batch_mod, "INITIAL_ROOM", 2)
    batch = BatchDecoder(tiny_engine, slots=3, capacity=512, initial=16, prefix=PrefixCache(size_mb=64))
    a = req(tiny_engine, "Soil 20.", n=4)
    long_run = req(tiny_engine, "Write a long story about vents.", system=None, n=200)
    done: dict = {}
    batch.add(long_run, on_delta=lambda d: None, on_done=lambda s: done.__setitem__("long", s))
    batch.add(a, on_delta=lambda d: None, on_done=lambda s: done.__setitem__("a", s))
    while "a" not in done:
        batch.step()
    assert batch.kept  # a's prompt is kept while the long request goes on decoding
    capacity_then = grown = batch.capacity
    while batch.active:
        batch.step()
        grown = max(grown, batch.capacity)
    assert grown > capacity_then  # the cache grew (rows copied) with a's prompt kept
    kept = max(map(len, batch.kept.values()))
    assert kept < batch.capacity < grown  # drained: it shrank, but kept room for the kept prompt
    b = req(tiny_engine, "Soil 90.", n=12)
    expected, _ = cold(tiny_engine, b)
    text, stats = run(batch, b)
    assert text == expected
    assert stats["prompt_cache_tokens"] >= len(system_prefix(tiny_engine, TINY_SYSTEM))


def test_a_pinned_system_prompt_is_copied_into_a_new_batch(tiny_engine):
    cache = PrefixCache(size_mb=64)
    pin = system_prefix(tiny_engine, TINY_SYSTEM)
    cache.set_pins([pin])
    p = req(tiny_engine, "Humidity 95.")
    assert tuple(p.tokens[: len(pin)]) == pin
    run(BatchDecoder(tiny_engine, slots=2, prefix=cache), p)  # fills the pin from its prefill
    assert cache.describe()["pins_filled"] == 1
    # another batch (its rows are empty): the pinned copy is used
    q = req(tiny_engine, "Soil moisture 10, temperature 18.")
    expected, _ = cold(tiny_engine, q)
    text, stats = run(BatchDecoder(tiny_engine, slots=2, prefix=cache), q)
    assert text == expected and stats["prompt_cache_tokens"] == len(pin)
    # chat with the same system message starts with the same tokens
    chat = req(tiny_engine, messages=[{"role": "system", "content": TINY_SYSTEM}, {"role": "user", "content": "Hi"}], system=None)
    assert common_prefix(chat.tokens, pin) == len(pin)


def test_the_budget_bounds_what_is_kept_and_zero_turns_it_off(tiny_engine):
    per_token = tiny_engine.info.kv_bytes(1)
    p1, p2 = req(tiny_engine, "Soil 20."), req(tiny_engine, "Soil 21.", system="A different system prompt.")
    # room for about one prompt: the least recently used one goes
    cache = PrefixCache(size_mb=(len(p1.tokens) + 8) * per_token / (1 << 20))
    batch = BatchDecoder(tiny_engine, slots=3, prefix=cache)
    run(batch, p1)
    run(batch, p2)
    assert batch.kept_bytes <= cache.limit_bytes
    assert [t for t in batch.kept.values()] == [list(p2.tokens)]
    # size 0: nothing is reused, answers unchanged
    off = BatchDecoder(tiny_engine, slots=2, prefix=PrefixCache(size_mb=0))
    run(off, p1)
    text, stats = run(off, p1)
    assert stats["prompt_cache_tokens"] == 0 and not off.kept
    assert text == cold(tiny_engine, p1)[0]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_smollm2_shared_system_prompt_same_answers_and_memory_given_back(smollm2_engine, seen_logits):
    eng = smollm2_engine
    system = SYSTEM * 3  # ~300 tokens
    cache = PrefixCache(size_mb=64)
    pin = system_prefix(eng, system)
    assert len(pin) > 250
    cache.set_pins([pin])
    batch = BatchDecoder(eng, slots=4, prefix=cache)
    uncached = BatchDecoder(eng, slots=4)
    questions = ["Temperature 34, humidity 50, soil 60.", "Temperature 20, soil 30.", "Is 12 degrees too cold?"]
    for i, q in enumerate(questions):
        p = req(eng, q, system=system, n=24)
        seen_logits.clear()
        expected, _ = run(uncached, p)
        cold_logits = list(seen_logits)
        seen_logits.clear()
        text, stats = run(batch, p)
        assert text == expected, q
        assert all(np.array_equal(a, b) for a, b in zip(seen_logits, cold_logits)) and len(seen_logits) == len(cold_logits)
        assert text == cold(eng, p)[0]  # and what a single stream (`edged run`) answers
        if i == 0:
            assert stats["prompt_cache_tokens"] == 0 and stats["prompt_eval_count"] == len(p.tokens)
        else:
            assert stats["prompt_cache_tokens"] >= len(pin)
            assert stats["prompt_eval_count"] == len(p.tokens) - stats["prompt_cache_tokens"]
    # a fresh batch gets the pinned copy
    p = req(eng, "Soil 10.", system=system, n=24)
    text, stats = run(BatchDecoder(eng, slots=4, prefix=cache), p)
    assert text == cold(eng, p)[0] and stats["prompt_cache_tokens"] == len(pin)
    # dropping it (what the governor does when memory is critical) gives the memory back
    held = cache.pinned_bytes + batch.kept_bytes
    assert held > 20 << 20
    before = rss()
    cache.keep = 0.0
    batch.fit_prefix_cache()
    assert cache.pinned_bytes == 0 and batch.kept_bytes == 0 and not batch.kept
    assert before - rss() > 0.8 * held


def test_daemon_reports_cache_tokens_pins_config_prompts_and_trims_under_memory_pressure(tmp_path, tiny_store):
    from helpers import wait_for
    from ops.conftest import FakeSys

    from edged.models.loading import load_engine
    from edged.ops.systemd import Notifier
    from edged.ops.wiring import attach

    engine = load_engine("tiny", store=tiny_store)
    fakesys = FakeSys(tmp_path / "sys")
    cfg = daemon_config(tmp_path, tiny_store.root, prefix_cache={"system_prompts": [TINY_SYSTEM]},
                        governor={"root": str(fakesys.root), "interval": 60})
    d = DaemonThread(cfg, engine=engine)
    ops = attach(d.server, notifier=Notifier(env={}))
    with d:
        sched = d.server.scheduler
        shared = len(system_prefix(engine, TINY_SYSTEM))
        body = {"system": TINY_SYSTEM, "options": {"temperature": 0, "num_predict": 5}}
        first = d.call({"id": 1, "prompt": "Soil 20.", **body})
        second = d.call({"id": 2, "prompt": "Temperature 35.", **body})
        assert first["prompt_cache_tokens"] == 0
        assert second["prompt_cache_tokens"] >= shared
        st = d.call({"op": "status"})["status"]["prefix_cache"]
        assert st["pins_filled"] == 1 and st["pinned_bytes"] > 0 and st["kept_bytes"] > 0
        # a budget just above what it holds (size_mb is live: SIGHUP sets it on this object)
        used = st["pinned_bytes"] + st["kept_bytes"]
        d.server.config.prefix_cache.size_mb = used * 1.05 / (1 << 20)
        # memory tight: the governor halves the budget, the worker drops what no longer fits
        fakesys.cgroup(100, high_mb=100 + 64 + 100)
        ops.governor.update()
        assert ops.governor.memory_state == "tight"

        def trimmed():
            s = sched.prefix_cache_status()
            return s["pinned_bytes"] + s["kept_bytes"] <= s["limit_bytes"] < used

        wait_for(trimmed, "the prefix cache to be trimmed")
        # memory critical: nothing is kept
        fakesys.cgroup(990, max_mb=1000)
        ops.governor.update()
        assert ops.governor.memory_state == "critical"
        wait_for(lambda: sched.prefix_cache_status()["pinned_bytes"] == sched.prefix_cache_status()["kept_bytes"] == 0,
                 "the prefix cache to be dropped")
        # pressure gone: requests are cached again
        fakesys.cgroup(100, max_mb=1000)
        ops.governor.update()
        d.server.config.prefix_cache.size_mb = 32
        d.call({"id": 3, "prompt": "Soil 20.", **body})
        again = d.call({"id": 4, "prompt": "Soil 25.", **body})
        assert again["prompt_cache_tokens"] >= shared


def test_bench_prefix_ratios_are_paired_by_round():
    from bench import prefix

    encode = lambda text: text.split()  # one "token" per word  # noqa: E731
    spec = prefix.build(encode, 300)
    assert len(encode(spec["a"]["text"])) > 300 and spec["a"]["ids"] == encode(spec["a"]["text"])
    assert spec["shared_tokens"] >= 300 and spec["a"]["ids"][:300] == spec["b"]["ids"][:300]
    assert spec["x"]["ids"][:10] != spec["a"]["ids"][:10]

    def run(uncached, cached, after):
        return {"prefix": {"uncached_ttft_s": uncached, "cached_ttft_s": cached, "after_other_ttft_s": after,
                           "prompt_tokens": 330, "shared_tokens": 305}}

    results = {"runs": {"edged": [run(1.0, 0.1, 0.1), run(2.0, 0.1, 0.2), {"error": "x"}],
                        "llamacpp": [run(2.0, 0.2, 1.0), run(2.0, 0.05, 0.8), run(1.0, 0.1, 0.5)]}}
    prefix.derive(results)
    assert results["prefix_cache_ttft_ratio"] == pytest.approx((0.1 + 0.05) / 2)  # 0.1/1, 0.1/2
    assert results["prefix_cache_ttft_ratio_vs_llamacpp_cached"] == pytest.approx((0.5 + 2.0) / 2)  # 0.1/0.2, 0.1/0.05
    assert results["prefix_cache"]["ratios"]["prefix_cache_ttft_ratio_vs_llamacpp_after_other"] == pytest.approx(0.175)
    md = "\n".join(prefix.markdown(results))
    assert "| llama.cpp Q8_0 + LlamaRAMCache |" in md and "goal ≤ 0.15" in md
