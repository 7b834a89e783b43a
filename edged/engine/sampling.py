"""Token sampling with Ollama's option semantics.

Greedy (temperature 0) never copies the vocabulary unless a repeat penalty has
to rewrite some logits. Sampling works on the top-k candidates only.
"""

from __future__ import annotations

import numpy as np

from edged.engine.request import Options


class Sampler:
    def __init__(self, options: Options):
        self.o = options
        # A fixed seed gives the same text for the same options; no seed draws one.
        self.rng = np.random.default_rng(options.seed)

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        o = self.o
        if o.repeat_penalty == 1.0 or o.repeat_last_n == 0 or not history:
            return logits
        recent = np.unique(np.asarray(history[-o.repeat_last_n :], dtype=np.int64))
        logits = logits.copy()
        vals = logits[recent]
        logits[recent] = np.where(vals > 0, vals / o.repeat_penalty, vals * o.repeat_penalty)
        return logits

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        logits = self.penalize(logits, history)
        o = self.o
        if o.temperature < 1e-4:  # below this the scaled logits overflow; the distribution is greedy anyway
            return int(np.argmax(logits))
        vocab = logits.shape[0]
        k = o.top_k if 0 < o.top_k < vocab else vocab
        if k < vocab:
            cand = np.argpartition(logits, vocab - k)[vocab - k :]
        else:
            cand = np.arange(vocab)
        order = np.argsort(logits[cand])[::-1]
        cand = cand[order]
        scaled = logits[cand].astype(np.float64) / o.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        keep = len(probs)
        if o.top_p < 1.0:
            # smallest prefix whose mass reaches top_p (always at least one token)
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), o.top_p) + 1))
        if o.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= o.min_p * probs[0]))))
        probs = probs[:keep] / probs[:keep].sum()
        return int(cand[self.rng.choice(keep, p=probs)])
