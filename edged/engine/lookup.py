"""Prompt-lookup (n-gram) speculative decoding: drafts from the text itself.

Answers about an input (extract fields from a log, summarise it, reformat it as
JSON) copy runs of tokens from the prompt, and a small model's own text repeats
itself. So the last few tokens (an n-gram, n = 3, 2, 1) are looked up in the
prompt and the text so far, and the tokens that followed their latest earlier
occurrence are the draft. The token to feed and the draft run through the graph
in one pass (a decode step reads all weights once, whatever the number of
tokens), which returns the logits after each of them (the graph's num_logits).
The engine does this for a request decoding alone (Generation, or the only
active slot of a BatchDecoder); several active requests share plain steps.

Verification: the rows are handed to Decoder.advance one after another, exactly
as plain decoding would hand them: each is processed with the history extended
by the tokens accepted so far (repeat penalty, grammar mask, temperature, top-k/p,
min-p) and sampled with the request's own random generator. A draft token is
accepted when the token chosen for its position is that token; the first position
where they differ keeps the chosen token and drops the rest of the draft. For a
point-mass draft d this is the rejection rule that preserves the sampling
distribution: d is accepted with probability p(d), and after a rejection the
token is distributed as p with d removed and renormalised. Drawn this way (one
draw per position, from the same generator), a seeded request's tokens are the
ones plain decoding draws from the same logits, and greedy picks the same argmax.
A grammar works unchanged: a draft token it forbids has probability 0 and is
rejected. The rejected positions of the KV cache are forgotten by lowering the
sequence's length (the next pass writes over them).

Numerics: the logits of a pass of several tokens are not bit-identical to those
of one-token steps. onnxruntime's attention multiplies by V with its own one-row
kernel when a pass has one token (~1e-7 relative difference), and int8 activation
quantization in the next matrix product can turn that into a flipped rounding:
on SmolLM2 int8 the logits differ by up to ~0.5-1.0 over the vocabulary (the same
happens between a prompt's prefill and one-token steps). So greedy text with
speculation is plain decoding's text until the first place where plain decoding's
two best tokens are within that noise (measured: 0.006-0.15 apart where 5 of 8
SmolLM2 answers of 128 tokens first differed); from there both are valid greedy
continuations of slightly different numbers. An fp32 graph gives the same text.
The drafts depend only on the request's own text (see COST_PER_TOKEN), so the same
request decoding alone gives the same text every time; it may differ at such a
near-tie when it shared the batch with others. engine.lookup: false turns it off.

When it pays: a verify pass of m drafted tokens costs about 1 + beta*m plain steps
(the extra rows' share of the matrix products, LM head included) and yields
1 + (accepted drafts) tokens. beta is COST_PER_TOKEN, a constant: measured 0.2-0.25
for SmolLM2 int8 on a 2-core AVX2 machine without VNNI, where int8 products run at
~30 GMAC/s per core. It is not estimated from the pass timings, although that would
follow the machine: timing-driven drafts would make a request's text (at the
near-ties above) depend on the machine's load. Each n-gram size keeps its own
running acceptance rate; the draft length is the one with the best expected tokens
per unit of cost under that rate, capped by an adaptive k (grows by 2 after a draft
accepted in full, shrinks by 1 after a rejection). When no length is expected to
gain, drafts from that n-gram size stop for PAUSE steps, then one single-token
draft probes whether they have become useful; each failed probe doubles the pause
(up to MAX_PAUSE), so text that never repeats itself costs a probe every 128
tokens at most, and text that turns repetitive later is caught within a pause.
"""

from __future__ import annotations

MAX_NGRAM = 3  # longest n-gram looked up
MAX_DRAFT = 8  # most tokens drafted per step (the verify pass feeds MAX_DRAFT + 1)
# Cost of one more token in a verify pass, as a fraction of a plain decode step.
COST_PER_TOKEN = 0.25
# Acceptance rate assumed for a draft from an n-gram of each size before any was verified.
PRIOR = {1: 0.3, 2: 0.45, 3: 0.6}
RATE_WEIGHT = 0.15  # weight of the newest outcome in the running acceptance rate
MIN_GAIN = 1.05  # a draft must promise this many tokens per unit of cost
PAUSE = 8  # steps without drafts from an n-gram size that stopped paying, before a probe
MAX_PAUSE = 128  # the longest pause (a failed probe doubles it)


class NgramIndex:
    """Latest occurrence of every n-gram (n <= max_n) of a growing token list that has a
    token after it. `tokens` is the decoder's history (prompt + accepted tokens),
    appended to by the decoder; the index catches up on each lookup."""

    def __init__(self, tokens: list[int], max_n: int = MAX_NGRAM):
        self.tokens = tokens
        self.max_n = max_n
        self._end: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        self._done = 1  # end positions below this are indexed (position 0 ends no n-gram)

    def _catch_up(self) -> None:
        h = self.tokens
        for e in range(self._done, len(h)):
            for n in range(1, min(self.max_n, e) + 1):
                self._end[n][tuple(h[e - n : e])] = e  # h[e-n:e] is followed by h[e]
        self._done = max(self._done, len(h))

    def draft(self, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest
        matching suffix n-gram, and that n (0 and [] when nothing matches). A copy that
        runs into the end of the list continues with its own start (a repeating cycle)."""
        self._catch_up()
        h = self.tokens
        size = len(h)
        for n in range(min(self.max_n, size), 0, -1):
            e = self._end[n].get(tuple(h[size - n :]))
            if e is not None:
                out: list[int] = []
                for j in range(k):
                    src = e + j
                    out.append(h[src] if src < size else out[src - size])
                return out, n
        return [], 0


def expected_gain(rate: float, m: int, cost: float = COST_PER_TOKEN) -> float:
    """Tokens per unit of cost of a verify pass with m drafted tokens, each accepted with
    probability `rate` given the ones before it were: (1 + rate + ... + rate^m) / (1 + cost*m)."""
    tokens, p = 1.0, 1.0
    for _ in range(m):
        p *= rate
        tokens += p
    return tokens / (1.0 + cost * m)


class Speculator:
    """Per-request drafting policy over an NgramIndex: which draft, how long, or none."""

    def __init__(self, history: list[int], *, max_draft: int = MAX_DRAFT, cost: float = COST_PER_TOKEN):
        self.index = NgramIndex(history)
        self.max_draft = max_draft
        self.cost = cost
        self.k = 4  # adaptive cap on the draft length
        self.rate = dict(PRIOR)  # running acceptance rate per n-gram size
        self.pause = dict.fromkeys(PRIOR, 0)  # steps left without drafts, per n-gram size
        self.wait = dict.fromkeys(PRIOR, PAUSE)  # the next pause's length
        self.probe_due = dict.fromkeys(PRIOR, False)  # a pause has passed: probe next time
        self._last: tuple[int, int, bool] | None = None  # (n, drafted, probe) awaiting its outcome

    def draft(self, limit: int) -> list[int]:
        """Tokens to verify with the next step (at most `limit`); [] for a plain step."""
        for size in self.pause:
            if self.pause[size]:
                self.pause[size] -= 1
        limit = min(limit, self.k, self.max_draft)
        if limit <= 0:
            return []
        tokens, n = self.index.draft(limit)
        if not tokens:
            return []
        rate, beta = self.rate[n], self.cost
        best_m, best = 0, MIN_GAIN
        for m in range(1, len(tokens) + 1):
            g = expected_gain(rate, m, beta)
            if g > best:
                best_m, best = m, g
        probe = False
        if best_m == 0:
            if self.pause[n] or not self.probe_due[n]:
                if not self.pause[n]:  # drafts of this size just stopped paying: pause them
                    self.pause[n], self.probe_due[n] = self.wait[n], True
                return []
            best_m, probe, self.probe_due[n] = 1, True, False
        self._last = (n, best_m, probe)
        return tokens[:best_m]

    def outcome(self, accepted: int) -> None:
        """How many tokens of the last draft were accepted."""
        if self._last is None:
            return
        n, drafted, probe = self._last
        self._last = None
        # Each accepted token is a success; the first rejected one (if any) a failure.
        trials = accepted + (accepted < drafted)
        observed = accepted / trials if trials else 0.0
        w = min(1.0, RATE_WEIGHT * trials)
        self.rate[n] += w * (observed - self.rate[n])
        if probe:
            self.wait[n] = PAUSE if accepted else min(MAX_PAUSE, 2 * self.wait[n])
        if accepted == drafted:
            self.k = min(self.max_draft, self.k + 2)
        else:
            self.k = max(1, self.k - 1)
