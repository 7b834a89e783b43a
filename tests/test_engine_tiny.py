"""Engine mechanics on the tiny random Llama (real onnxruntime, real tokenizer)."""

import threading

import pytest

from edged.engine.request import GenerateRequest
from edged.errors import ContextOverflow


def gen(engine, prompt="Paris is", **opts):
    g = engine.generate(GenerateRequest.from_dict({"prompt": prompt, "options": opts}))
    deltas = list(g)
    return g, deltas


def test_stats_use_ollama_names_and_units(tiny_engine):
    g, deltas = gen(tiny_engine, temperature=0, num_predict=8)
    s = g.stats
    assert set(s) >= {"done_reason", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration", "load_duration", "total_duration"}
    assert s["eval_count"] <= 8 and s["prompt_eval_count"] > 0
    assert s["total_duration"] >= s["prompt_eval_duration"] + s["eval_duration"]
    assert "".join(deltas) == g.text


def test_greedy_is_deterministic_and_num_predict_caps(tiny_engine):
    a, _ = gen(tiny_engine, temperature=0, num_predict=12)
    b, _ = gen(tiny_engine, temperature=0, num_predict=12)
    assert a.tokens == b.tokens
    if a.done_reason == "length":
        assert a.stats["eval_count"] == 12


def test_seeded_sampling_reproducible(tiny_engine):
    a, _ = gen(tiny_engine, temperature=1.0, seed=42, num_predict=16)
    b, _ = gen(tiny_engine, temperature=1.0, seed=42, num_predict=16)
    c, _ = gen(tiny_engine, temperature=1.0, seed=43, num_predict=16)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_stop_string_ends_generation_and_is_not_emitted(tiny_engine):
    full, _ = gen(tiny_engine, temperature=0, num_predict=24, repeat_penalty=1.0)
    text = full.text
    assert len(text) > 4, text
    stop = text[2:5]
    g, _ = gen(tiny_engine, temperature=0, num_predict=24, repeat_penalty=1.0, stop=[stop])
    assert g.done_reason == "stop"
    assert g.text == text[: text.index(stop)]


def test_cancel_from_another_thread(tiny_engine):
    cancel = threading.Event()
    g = tiny_engine.generate(GenerateRequest.from_dict({"prompt": "hi", "options": {"num_predict": 200, "temperature": 1, "seed": 1}}), cancel=cancel)
    n = 0
    for _ in g:
        n += 1
        if n == 3:
            threading.Thread(target=cancel.set).start()
    assert g.done_reason == "cancel"
    assert g.stats["eval_count"] < 200


def test_context_overflow_is_a_clear_error_or_truncates(tiny_engine):
    long = "Paris is the capital of France. " * 40
    with pytest.raises(ContextOverflow, match="context holds 64"):
        tiny_engine.prepare(GenerateRequest.from_dict({"prompt": long, "options": {"num_ctx": 64}}))
    p = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": long, "options": {"num_ctx": 64, "truncate": True, "num_predict": 8}}))
    assert p.truncated > 0 and len(p.tokens) + p.max_new <= 64
    g = tiny_engine.generate(GenerateRequest.from_dict({"prompt": long, "options": {"num_ctx": 64, "truncate": True, "num_predict": 8}}))
    g.run()
    assert g.stats["truncated_tokens"] == p.truncated


def test_kv_cache_is_sized_per_request(tiny_engine):
    p = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": "hi", "options": {"num_predict": 10}}))
    assert p.capacity == len(p.tokens) + 10
    p = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": "hi"}))
    assert p.capacity == tiny_engine.context_length  # -1: until the context is full


def test_chat_messages_use_the_models_template(tiny_engine):
    req = GenerateRequest.from_dict({"messages": [{"role": "user", "content": "hello"}], "system": "be brief"})
    assert tiny_engine.render(req) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    raw = GenerateRequest.from_dict({"prompt": "plain", "raw": True})
    assert tiny_engine.render(raw) == "plain"


def test_an_idle_engine_burns_no_cpu(tiny_engine):
    """Bounded spinning (the default) stops right after a run: nothing spins between requests."""
    import os
    import time

    gen(tiny_engine, temperature=0, num_predict=8)
    t0 = os.times()
    time.sleep(1.0)
    t1 = os.times()
    assert (t1.user + t1.system) - (t0.user + t0.system) < 0.1
