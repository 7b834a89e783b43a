"""The quality gate: is the int8 model still the fp32 model?

Two measurements against the fp32 graph of the same weights:
  perplexity ratio   ppl(int8) / ppl(fp32) on a built-in text, teacher-forced
  agreement          top-1 agreement with fp32's greedy continuation (32 tokens)
                     of a few chat prompts, teacher-forced: int8 sees fp32's
                     prefix at every step, so one early near-tie does not count
                     as 32 misses, while a garbling model scores near zero.
A model fails when ppl ratio > 1.10 or agreement < 0.80.
"""

from __future__ import annotations

import math

import numpy as np

MAX_PPL_RATIO = 1.10
MIN_AGREEMENT = 0.80
AGREEMENT_TOKENS = 32

GATE_TEXT = (
    "The Raspberry Pi is a series of small single-board computers developed in the United Kingdom. "
    "It was created to promote the teaching of basic computer science in schools, and it became popular "
    "for robotics, home automation and industrial control. A board runs Linux from a memory card, and its "
    "pins let it read sensors and switch relays. Water boils at one hundred degrees Celsius at sea level. "
    "Paris is the capital of France, and Berlin is the capital of Germany. The quick brown fox jumps over "
    "the lazy dog. In the morning the farmer fed the chickens, checked the weather and drove to the market."
)
GATE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a CPU does.",
    "Give me three tips for staying healthy.",
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def perplexity(runner, tokens: list[int]) -> float:
    seq = runner.sequence(len(tokens))
    logits = seq.forward(tokens[:1])
    nll = 0.0
    for t in tokens[1:]:
        nll -= _log_softmax(logits)[t]
        logits = seq.forward([t])
    return math.exp(nll / (len(tokens) - 1))


def greedy(runner, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    seq = runner.sequence(len(prompt) + n)
    logits = seq.forward(prompt)
    out: list[int] = []
    while len(out) < n:
        t = int(np.argmax(logits))
        out.append(t)
        if t in eos:
            break
        logits = seq.forward([t])
    return out


def teacher_forced_agreement(runner, prompt: list[int], reference: list[int]) -> tuple[int, int]:
    seq = runner.sequence(len(prompt) + len(reference))
    logits = seq.forward(prompt)
    hits = 0
    for t in reference:
        hits += int(np.argmax(logits)) == t
        logits = seq.forward([t])
    return hits, len(reference)


def evaluate(reference, candidate, *, text_tokens: list[int], prompts: list[list[int]], eos: set[int], progress=None) -> dict:
    """Run the gate; return the result dict stored in the manifest."""
    say = progress or (lambda *_: None)
    say("quality gate: perplexity (fp32)")
    ppl_ref = perplexity(reference, text_tokens)
    say("quality gate: perplexity (int8)")
    ppl_cand = perplexity(candidate, text_tokens)
    hits = total = 0
    first_divergence = []
    for i, prompt in enumerate(prompts):
        say(f"quality gate: agreement, prompt {i + 1}/{len(prompts)}")
        ref = greedy(reference, prompt, AGREEMENT_TOKENS, eos)
        h, n = teacher_forced_agreement(candidate, prompt, ref)
        hits, total = hits + h, total + n
        free = greedy(candidate, prompt, len(ref), eos)
        first_divergence.append(next((j for j, (a, b) in enumerate(zip(ref, free)) if a != b), len(ref)))
    ratio = ppl_cand / ppl_ref
    agreement = hits / max(total, 1)
    failures = []
    if not ratio <= MAX_PPL_RATIO:
        failures.append(f"perplexity ratio {ratio:.3f} > {MAX_PPL_RATIO:.2f} (quantized {ppl_cand:.2f} vs fp32 {ppl_ref:.2f})")
    if not agreement >= MIN_AGREEMENT:
        failures.append(f"greedy-token agreement {agreement:.3f} < {MIN_AGREEMENT:.2f} over {total} tokens")
    return {
        "status": "passed" if not failures else "failed",
        "perplexity_fp32": round(ppl_ref, 4),
        "perplexity_int8": round(ppl_cand, 4),
        "perplexity_ratio": round(ratio, 4),
        "agreement": round(agreement, 4),
        "agreement_tokens": total,
        "free_running_first_divergence": first_divergence,
        "thresholds": {"max_perplexity_ratio": MAX_PPL_RATIO, "min_agreement": MIN_AGREEMENT},
        "failures": failures,
    }
