"""Continuous batching gives each request exactly what it would get alone."""

import threading

from edged.engine.batch import BatchDecoder
from edged.engine.request import GenerateRequest

PROMPTS = ["Paris is", "The quick brown", "Grüße aus", "A Raspberry Pi runs Linux; it reads sensors", "MQTT"]


def alone(engine, prompt, n):
    g = engine.generate(GenerateRequest.from_dict({"prompt": prompt, "options": {"temperature": 0, "num_predict": n}}))
    g.run()
    return g.text, g.stats


def test_batched_greedy_matches_single_stream_with_joins_and_leaves(tiny_engine, monkeypatch):
    from edged.engine import batch as batch_mod

    lengths = [12, 5, 20, 9, 15]
    expected = [alone(tiny_engine, p, n) for p, n in zip(PROMPTS, lengths)]
    # room for only 2 new tokens at a join: the cache grows while other rows hold tokens
    monkeypatch.setattr(batch_mod, "INITIAL_ROOM", 2)
    batch = BatchDecoder(tiny_engine, slots=3, capacity=128, initial=4)
    grown = []
    allocate = batch._allocate
    monkeypatch.setattr(batch, "_allocate", lambda c: (grown.append(len(batch.active)), allocate(c)))
    results: dict[int, dict] = {}
    texts = {i: [] for i in range(len(PROMPTS))}
    pending = list(range(len(PROMPTS)))
    steps = 0
    while pending or batch.active:
        while pending and batch.free:
            i = pending.pop(0)
            prep = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": PROMPTS[i], "options": {"temperature": 0, "num_predict": lengths[i]}}))
            batch.add(prep, on_delta=texts[i].append, on_done=lambda st, i=i: results.__setitem__(i, st))
        steps += batch.step()
    for i, (text, stats) in enumerate(expected):
        assert "".join(texts[i]) == text, PROMPTS[i]
        assert results[i]["eval_count"] == stats["eval_count"]
        assert results[i]["done_reason"] == stats["done_reason"]
    assert steps > max(lengths)  # several sequences really shared steps
    assert any(n >= 1 for n in grown), grown  # grew while another row held tokens (copied)


def test_cancel_one_slot_leaves_the_others(tiny_engine):
    batch = BatchDecoder(tiny_engine, slots=2, capacity=128)
    cancel = threading.Event()
    done = {}
    for i, c in ((0, cancel), (1, None)):
        prep = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": PROMPTS[i], "options": {"temperature": 0, "num_predict": 30}}))
        batch.add(prep, cancel=c, on_delta=lambda d: None, on_done=lambda st, i=i: done.__setitem__(i, st))
    batch.step()
    cancel.set()
    while batch.active:
        batch.step()
    assert done[0]["done_reason"] == "cancel" and done[0]["eval_count"] < 30
    assert done[1]["eval_count"] == alone(tiny_engine, PROMPTS[1], 30)[1]["eval_count"]


def test_growing_sequence_cache_keeps_its_contents(tiny_engine):
    import numpy as np

    runner = tiny_engine.runner
    small, big = runner.sequence(3, 64), runner.sequence(64)
    prompt = [5, 9, 14, 20, 33]
    a, b = small.forward(prompt).copy(), big.forward(prompt).copy()
    for t in [7, 8, 9, 10, 11, 12, 13]:
        np.testing.assert_allclose(a, b, atol=1e-5)
        a, b = small.forward([t]).copy(), big.forward([t]).copy()
    assert small.capacity < 64 and small.capacity >= small.length


def test_a_drained_batch_gives_its_grown_cache_back(tiny_engine):
    batch = BatchDecoder(tiny_engine, slots=2, capacity=128, initial=8)
    prep = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": PROMPTS[3], "options": {"temperature": 0, "num_predict": 40}}))
    done = []
    batch.add(prep, on_delta=lambda d: None, on_done=done.append)
    assert batch.capacity >= len(prep.tokens) + 1 > 8
    while batch.active:
        batch.step()
    assert done and batch.capacity == 8


def test_kv_buffers_become_resident_only_where_written():
    import numpy as np

    from edged.engine.runner import lazy_zeros

    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    before = rss_kb()
    kv = lazy_zeros((4, 3, 8192, 64))  # 24 MiB
    kv[0, :, :16] = 1.0
    assert rss_kb() - before < 4096 and kv.sum() == 3 * 16 * 64 and not kv[1:].any()
