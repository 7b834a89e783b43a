"""Prompt-lookup speculative decoding (engine/lookup.py): drafts, verification, rollback.

What a user would notice: the text is the text plain decoding gives (greedy, and a
seeded sample), sampling keeps its distribution, the stats count drafts, several
requests in a batch still decode together, and a model made before the num_logits
input still runs.

Exact token identity is asserted on an fp32 graph of the tiny model. On int8 graphs
a pass of several tokens and a one-token step round differently in attention
(onnxruntime's one-row matrix product has its own kernel), and the int8 activation
quantization of the next layer can turn that 1e-7 difference into a flipped rounding:
SmolLM2's logits then differ by ~0.5 at most over the vocabulary. There the text must
be plain decoding's, or leave it only at a near-tie of plain decoding's two best tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest

from edged.engine.batch import BatchDecoder
from edged.engine.engine import Decoder, Engine
from edged.engine.lookup import MAX_DRAFT, NgramIndex, Speculator, expected_gain
from edged.engine.request import GenerateRequest
from edged.engine.runner import EngineConfig
from edged.models.store import Model

TINY_PROMPTS = [
    "The quick brown fox", "Paris is the capital of France.", "Grüße aus München!", "A Raspberry Pi runs Linux",
    "Berlin is the capital of Germany. Paris", "Emoji: 🙂🚀", "it reads sensors and talks MQTT", "The lazy dog",
    "東京は日本の首都です。", "jumps over the lazy dog. The quick", "Ça va?", "MQTT to a broker. A Raspberry Pi",
    "capital capital capital", "France. France. France.", "talks", "The quick brown fox jumps over the lazy dog. The",
]
# How far apart plain decoding's two best logits may be where an int8 model's
# speculative text first leaves plain decoding's (see the module doc).
NEAR_TIE = 0.5


def request(prompt: str, n: int, **options) -> GenerateRequest:
    return GenerateRequest.from_dict(
        {"prompt": prompt, "raw": True, "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": n, **options}},
        max_prompt_chars=None)


@contextmanager
def speculation(engine: Engine, on: bool):
    saved = engine.speculative
    engine.speculative = on
    try:
        yield
    finally:
        engine.speculative = saved


def generate(engine: Engine, req: GenerateRequest, *, spec: bool):
    with speculation(engine, spec):
        g = engine.generate(req)
        g.run()
    return g


def plain_greedy(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding, one token per step, with the gap between the two best
    logits at each step (no EOS: a fixed number of tokens)."""
    seq = engine.runner.sequence(len(prompt) + n + 1)
    logits = seq.forward(prompt)
    tokens, gaps = [], []
    for _ in range(n):
        top = np.partition(logits, -2)[-2:]
        gaps.append(float(abs(top[1] - top[0])))
        tokens.append(int(np.argmax(logits)))
        logits = seq.forward([tokens[-1]])
    return tokens, gaps


def assert_plain_or_near_tie(plain: list[int], gaps: list[float], got: list[int], what: str) -> None:
    div = next((i for i, (a, b) in enumerate(zip(plain, got)) if a != b), None)
    if div is None:
        assert got == plain[: len(got)], what
        return
    assert gaps[div] <= NEAR_TIE, f"{what}: leaves plain greedy at token {div}, where its best two logits are {gaps[div]:.3f} apart"


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fp32_tiny(tiny_hf, tiny_store, tmp_path_factory) -> Engine:
    """The tiny model's fp32 graph (the quality gate's reference) as an engine."""
    import shutil

    from edged.models.builder import DecoderSpec, build_decoder, save_model
    from edged.models.convert import load_source

    src = load_source(tiny_hf, lambda _msg: None)
    installed = tiny_store.get("tiny")
    folder = tmp_path_factory.mktemp("tiny-fp32") / "tiny-fp32"
    shutil.copytree(installed.path, folder)
    save_model(build_decoder(DecoderSpec.from_hf_config(src.config), src.weights), str(folder / "fp32.onnx"))
    manifest = json.loads(json.dumps(installed.manifest))
    manifest["files_by_role"]["model"] = "fp32.onnx"
    return Engine(Model("tiny-fp32", folder, manifest), EngineConfig(threads=2))


@pytest.fixture(scope="session")
def old_graph_tiny(fp32_tiny, tmp_path_factory) -> Engine:
    """The same fp32 graph as a converter before num_logits made it: logits of the last
    position only (num_logits is a constant, not an input)."""
    import onnx

    folder = fp32_tiny.model.path
    m = onnx.load(str(folder / "fp32.onnx"), load_external_data=False)
    m.graph.input.remove(next(i for i in m.graph.input if i.name == "num_logits"))
    onnx.save_model(m, str(folder / "old.onnx"))  # weights stay in fp32.onnx.data
    manifest = json.loads(json.dumps(fp32_tiny.model.manifest))
    manifest["files_by_role"]["model"] = "old.onnx"
    return Engine(Model("tiny-old", folder, manifest), EngineConfig(threads=2))


class Oracle(Speculator):
    """Drafts a planned continuation instead of looking it up, to put accepted and
    rejected tokens at chosen places: `plan` holds the text plain decoding gives, and
    every `wrong`-th draft has its last token made wrong (0: none)."""

    def __init__(self, history: list[int], plan: list[int], *, k: int, wrong: int = 0, vocab: int = 2):
        super().__init__(history)
        self.history, self.plan, self.fixed_k, self.wrong, self.vocab = history, plan, k, wrong, vocab
        self.start = len(history) - 1  # made after the first token was chosen
        self.outcomes: list[int] = []
        self.made = 0

    def draft(self, limit: int) -> list[int]:
        at = len(self.history) - self.start  # the tokens after the one about to be fed
        out = list(self.plan[at : at + min(limit, self.fixed_k)])
        if out:
            self.made += 1
            if self.wrong and self.made % self.wrong == 0:
                out[-1] = (out[-1] + 1) % self.vocab
        return out

    def outcome(self, accepted: int) -> None:
        self.outcomes.append(accepted)


class Echo(Speculator):
    """Drafts the last token k times: a draft on every step, mostly rejected."""

    def __init__(self, history: list[int], k: int):
        super().__init__(history)
        self.history, self.fixed_k = history, k

    def draft(self, limit: int) -> list[int]:
        return [self.history[-1]] * min(limit, self.fixed_k)


# -- drafting -----------------------------------------------------------------------------

def test_ngram_index_drafts_what_followed_the_latest_longest_match():
    h = [1, 2, 3, 9, 9, 3, 4, 5, 6, 1, 2, 3]
    idx = NgramIndex(h)
    assert idx.draft(3) == ([9, 9, 3], 3)  # (1, 2, 3) matched, not just (3,) followed by 4
    h += [7]
    assert idx.draft(2) == ([], 0)  # 7 never occurred before
    h += [3, 4]
    assert idx.draft(4) == ([5, 6, 1, 2], 2)  # (3, 4) matched; the index caught up on the appends


def test_ngram_index_continues_a_cycle_past_the_end():
    assert NgramIndex([5, 7, 8, 7, 8]).draft(5) == ([7, 8, 7, 8, 7], 2)


def test_speculator_adapts_draft_length_and_turns_off_and_on():
    history = [1, 2, 3, 4] * 20
    sp = Speculator(history, cost=0.25)
    lengths = []
    for _ in range(6):  # every draft accepted in full: k grows to the cap
        d = sp.draft(100)
        lengths.append(len(d))
        sp.outcome(len(d))
    assert lengths[0] <= 4 and lengths[-1] == MAX_DRAFT, lengths
    rejected = 0
    while sp.draft(100):  # everything rejected: shorter drafts, then none
        sp.outcome(0)
        rejected += 1
        assert rejected < 30
    assert sp.k == 1 and rejected > 3

    def gap() -> int:
        """Steps without a draft until the next one (a one-token probe), which is rejected."""
        steps = 1
        while not (d := sp.draft(100)):
            steps += 1
            assert steps < 1000
        assert len(d) == 1
        sp.outcome(0)
        return steps

    gaps = [gap() for _ in range(6)]
    assert gaps == sorted(gaps) and gaps[0] >= 8 and gaps[-1] >= 128 and gaps[-1] == gaps[-2], gaps  # backs off
    while not sp.draft(100):
        pass
    sp.outcome(1)  # the probe is accepted: this kind of draft is worth trying again soon
    assert gap() < gaps[-1]
    assert sp.draft(0) == []  # no room left


def test_expected_gain():
    assert expected_gain(1.0, 4, 0.25) == pytest.approx(5 / 2)
    assert expected_gain(0.0, 3, 0.25) < 1 < expected_gain(0.6, 2, 0.25)


# -- verification: the text is plain decoding's -------------------------------------------

def test_greedy_is_plain_greedy_on_many_prompts_fp32(fp32_tiny):
    drafted = 0
    for p in TINY_PROMPTS:
        for n in (7, 40):
            plain = generate(fp32_tiny, request(p, n), spec=False)
            spec = generate(fp32_tiny, request(p, n), spec=True)
            assert spec.tokens == plain.tokens and spec.text == plain.text, p
            assert spec.stats["eval_count"] == plain.stats["eval_count"]
            assert spec.stats["done_reason"] == plain.stats["done_reason"]
            assert plain.stats["draft_tokens"] == 0
            assert 0 <= spec.stats["accepted_tokens"] <= spec.stats["draft_tokens"]
            drafted += spec.stats["draft_tokens"]
    assert drafted > 0


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.02,
                                           "repeat_penalty": 1.3, "repeat_last_n": 16}])
def test_planned_drafts_in_a_batch_give_plain_text_fp32(fp32_tiny, options):
    """Drafts accepted in full, in part and not at all, at many places, through the
    daemon's path (BatchDecoder); with sampling, each position is processed with the
    history extended by the accepted tokens (repeat penalty) and drawn from the
    request's generator, so a seeded request gives the plain text too."""
    for i, p in enumerate(TINY_PROMPTS[:8]):
        opts = {**options, "seed": i} if options else options
        plain = generate(fp32_tiny, request(p, 48, **opts), spec=False)
        for k, wrong in ((MAX_DRAFT, 0), (3, 2), (1, 2)):
            batch = BatchDecoder(fp32_tiny, slots=2, capacity=128)
            done, text = [], []
            with speculation(fp32_tiny, True):
                b = batch.add(fp32_tiny.prepare(request(p, 48, **opts)), on_delta=text.append, on_done=done.append)
            dec = batch.active[b].decoder if batch.active else None
            if dec is not None:
                dec.lookup = oracle = Oracle(dec.history, plain.tokens, k=k, wrong=wrong, vocab=fp32_tiny.info.vocab_size)
            while batch.active:
                batch.step()
            assert "".join(text) == plain.text, (p, k)
            assert done[0]["eval_count"] == plain.stats["eval_count"]
            assert done[0]["done_reason"] == plain.stats["done_reason"]
            if dec is not None and len(plain.tokens) > 3:
                assert done[0]["draft_tokens"] > 0
                if not wrong:
                    assert done[0]["accepted_tokens"] == done[0]["draft_tokens"]  # the plan is the text
                else:
                    assert 0 < done[0]["accepted_tokens"] < done[0]["draft_tokens"]
                assert oracle.outcomes


def test_acceptance_rule_keeps_the_sampling_distribution(tiny_engine):
    """A draft token d is accepted with probability p(d) under the processed
    distribution; a rejected one is replaced by a draw from p without d, renormalised."""
    temperature = 1.5
    prepared = tiny_engine.prepare(request("The quick brown fox", 1000, temperature=temperature, top_k=0, top_p=1.0))
    logits = tiny_engine.runner.sequence(len(prepared.tokens) + 1).forward(prepared.tokens).copy()
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    d = int(np.argsort(p)[-2])  # the second most likely token: p(d) well inside (0, 1)
    n = 3000
    rejected = Counter()
    accepted = 0
    for seed in range(n):
        dec = Decoder(tiny_engine, replace(prepared, options=replace(prepared.options, seed=seed)), None)
        _, tok = dec.advance(logits.copy(), expect=d)
        assert dec.accepted == (tok == d)
        if tok == d:
            accepted += 1
        else:
            rejected[tok] += 1
    sd = np.sqrt(p[d] * (1 - p[d]) / n)
    assert abs(accepted / n - p[d]) < 4 * sd, (accepted / n, p[d])
    # rejected tokens: chi-square against p without d, renormalised (cells with >= 10 expected)
    q = p.copy()
    q[d] = 0
    q /= q.sum()
    m = n - accepted
    big = [t for t in range(len(q)) if q[t] * m >= 10]
    observed = [rejected[t] for t in big] + [m - sum(rejected[t] for t in big)]
    expected = [q[t] * m for t in big] + [m * (1 - q[big].sum())]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    dof = len(observed) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # far below: a wrong rule is off by orders of magnitude


def test_sampled_text_distribution_with_and_without_speculation(tiny_engine):
    """The first tokens of sampled answers over many seeds: the same distribution (the
    same text, seed for seed, but for numerical near-ties)."""
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown"
    opts = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    plain, spec = Counter(), Counter()
    same = 0
    seeds = 300
    for seed in range(seeds):
        a = generate(tiny_engine, request(prompt, 6, seed=seed, **opts), spec=False).tokens
        b = generate(tiny_engine, request(prompt, 6, seed=seed, **opts), spec=True).tokens
        plain[tuple(a[:2])] += 1
        spec[tuple(b[:2])] += 1
        same += a == b
    tv = 0.5 * sum(abs(plain[k] - spec[k]) for k in set(plain) | set(spec)) / seeds
    assert tv <= 0.05, tv
    assert same >= 0.95 * seeds


def test_int8_greedy_is_plain_greedy_or_leaves_it_at_a_near_tie(tiny_engine):
    for p in TINY_PROMPTS:
        prepared = tiny_engine.prepare(request(p, 40))
        plain, gaps = plain_greedy(tiny_engine, prepared.tokens, prepared.max_new)
        got = generate(tiny_engine, request(p, 40), spec=True).tokens
        assert_plain_or_near_tie(plain, gaps, got, p)


# -- integration --------------------------------------------------------------------------

def test_graph_without_num_logits_decodes_plainly(old_graph_tiny, fp32_tiny):
    assert not old_graph_tiny.runner.multi_logits and not old_graph_tiny.speculative
    assert fp32_tiny.runner.multi_logits
    for p in TINY_PROMPTS[:4]:
        old = old_graph_tiny.generate(request(p, 30))
        old.run()
        assert old.stats["draft_tokens"] == 0
        assert old.tokens == generate(fp32_tiny, request(p, 30), spec=False).tokens
    batch = BatchDecoder(old_graph_tiny, slots=2, capacity=128)
    done = []
    batch.add(old_graph_tiny.prepare(request(TINY_PROMPTS[0], 20)), on_delta=lambda d: None, on_done=done.append)
    while batch.active:
        batch.step()
    alone = old_graph_tiny.generate(request(TINY_PROMPTS[0], 20))
    alone.run()
    assert done[0]["draft_tokens"] == 0 and done[0]["eval_count"] == alone.stats["eval_count"]


def test_batch_speculates_only_while_one_request_is_active(fp32_tiny):
    """With two active requests the shared step runs (one token each, no drafts); a
    request left alone speculates again. Each text is the one it gets alone."""
    prompts = [TINY_PROMPTS[12], TINY_PROMPTS[13]]
    lengths = [60, 12]
    alone = [generate(fp32_tiny, request(p, n), spec=False) for p, n in zip(prompts, lengths)]
    batch = BatchDecoder(fp32_tiny, slots=4, capacity=128)
    texts = {0: [], 1: []}
    done = {}
    with speculation(fp32_tiny, True):
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            b = batch.add(fp32_tiny.prepare(request(p, n)), on_delta=texts[i].append,
                          on_done=lambda st, i=i: done.__setitem__(i, st))
            # drafts on every step, mostly rejected (the draft policy would stop on its own)
            batch.active[b].decoder.lookup = Echo(batch.active[b].decoder.history, 2)
    drafted_while_shared = 0
    while batch.active:
        shared = len(batch.active) > 1
        before = {b: s.decoder.drafted for b, s in batch.active.items()}
        batch.step()
        if shared:
            drafted_while_shared += sum(s.decoder.drafted - before[b] for b, s in batch.active.items() if b in before)
    assert drafted_while_shared == 0
    for i in (0, 1):
        assert "".join(texts[i]) == alone[i].text
        assert done[i]["eval_count"] == alone[i].stats["eval_count"]
    assert done[0]["draft_tokens"] > 0  # alone after request 1 ended


def test_engine_config_turns_speculation_off(tiny_store):
    from edged.models.loading import load_engine

    off = load_engine("tiny", store=tiny_store, config=EngineConfig(threads=1, lookup=False))
    assert off.runner.multi_logits and not off.speculative
    g = off.generate(request("The quick brown fox", 20))
    g.run()
    assert g.stats["draft_tokens"] == 0


# -- SmolLM2 ------------------------------------------------------------------------------

LOG = "\n".join(
    f"10:{i:02d} sensor=bed-{i % 4 + 1} temp={18 + i % 7}.{i % 10}C humidity={55 + i % 9}% soil={30 + i % 13}"
    for i in range(10))
GROUNDED = [
    f"Sensor log:\n{LOG}\n\nRewrite every line of the log as a JSON object with the keys time, sensor, temp, humidity and soil.",
    f"Sensor log:\n{LOG}\n\nCopy the lines of sensor bed-2.",
]


def test_smollm2_grounded_answers_accept_drafts_and_stay_plain(smollm2_engine):
    eng = smollm2_engine
    for text in GROUNDED:
        req = GenerateRequest.from_dict({"messages": [{"role": "user", "content": text}],
                                         "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 96}})
        prepared = eng.prepare(req)
        plain, gaps = plain_greedy(eng, prepared.tokens, prepared.max_new)
        g = generate(eng, req, spec=True)
        assert_plain_or_near_tie(plain, gaps, g.tokens, text[-40:])
        st = g.stats
        assert st["accepted_tokens"] >= 0.3 * st["eval_count"], st  # most of the answer is copied
        # the daemon's path: a 4-slot batch with this request alone
        batch = BatchDecoder(eng, slots=4)
        done = []
        with speculation(eng, True):
            b = batch.add(eng.prepare(req), on_delta=lambda d: None, on_done=done.append)
            dec = batch.active[b].decoder
            while batch.active:
                batch.step()
        assert done[0]["accepted_tokens"] >= 0.3 * done[0]["eval_count"], done[0]
        assert_plain_or_near_tie(plain, gaps, dec.tokens, "batch: " + text[-40:])


def test_smollm2_json_format_with_speculation(smollm2_engine):
    """A grammar-constrained answer: drafts are checked against the grammar's mask like
    any sampled token (a draft token the grammar forbids has probability 0)."""
    req = GenerateRequest.from_dict({
        "messages": [{"role": "user", "content": f"Sensor log:\n{LOG}\n\nGive the readings of bed-1 as JSON."}],
        "format": "json", "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 80}})
    plain = generate(smollm2_engine, req, spec=False)
    spec = generate(smollm2_engine, req, spec=True)
    assert spec.stats["draft_tokens"] > 0
    if spec.stats["done_reason"] == "stop":
        json.loads(spec.text)
    div = next((i for i, (a, b) in enumerate(zip(plain.tokens, spec.tokens)) if a != b), None)
    assert div is None or div > 8, (plain.text, spec.text)


def test_speculation_with_the_prefix_cache(fp32_tiny):
    """A request that reuses an earlier prompt's KV from a kept slot speculates on that
    row like any other: its text is the one it gets alone without the cache."""
    from edged.engine.prefix import PrefixCache

    shared = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    prompts = [shared + "The quick brown", shared + "Berlin is the capital of Germany. Paris"]
    batch = BatchDecoder(fp32_tiny, slots=2, capacity=256, prefix=PrefixCache(size_mb=8))
    for p in prompts:
        alone = generate(fp32_tiny, request(p, 40), spec=False)
        done, text = [], []
        with speculation(fp32_tiny, True):
            b = batch.add(fp32_tiny.prepare(request(p, 40)), on_delta=text.append, on_done=done.append)
            if batch.active:
                batch.active[b].decoder.lookup = Echo(batch.active[b].decoder.history, 3)
            while batch.active:
                batch.step()
        assert "".join(text) == alone.text, p
        assert done[0]["eval_count"] == alone.stats["eval_count"]
    assert done[0]["prompt_cache_tokens"] > 0 and done[0]["draft_tokens"] > 0
