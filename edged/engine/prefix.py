"""Prompt prefix cache: requests that start like an earlier one skip that part of the prefill.

On a Pi, prompt processing dominates a request (a 300-token system prompt costs
seconds), and the requests of a fleet repeat the same instructions. Two places
keep key/value tensors for reuse:

- batch slots (engine/batch.py): when a request ends, its row of the batch cache
  keeps the KV of its prompt together with the prompt's tokens. A new request takes
  the free slot whose kept tokens share the longest prefix with its prompt and
  prefills only the rest.
- pinned prefixes (`PrefixCache`): copies of the KV of configured system prompts
  (a route's, or `prefix_cache.system_prompts`). A pinned prefix is filled, at no
  extra compute, from the first prefill that covers it; later, a request that starts
  with it is given a copy in its slot row when no slot holds a longer match.

Only KV computed by a prefill of at least two tokens is reused. onnxruntime gives
bit-identical keys and values for a position whatever the chunk around it, as long
as the chunk holds two or more tokens; a single token (a decode step, or a lone
last prompt token) takes another path whose results differ slightly (measured on
SmolLM2: up to 0.36 in a logit, enough to flip a greedy pick between two close
tokens). So generated tokens are never
offered for reuse, and the rest of a prompt is split so that no run is a single
token unless the uncached prefill would have run that token alone too: greedy
output with the cache is the same as without it.

Memory: `PrefixCache.limit_bytes` (prefix_cache.size_mb, scaled down by the governor
under memory pressure) bounds the pinned copies and the KV kept in free slots
together. What is evicted is given back to the kernel at once (`discard`).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edged.engine.runner import MADV_DONTNEED, lazy_zeros

MB = 1 << 20


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def reusable(match: int, n: int, chunk: int) -> int:
    """How many of a prompt's `n` tokens to take from a cache that matches `match` of
    them: at least one token is evaluated (its logits start the answer), and the
    evaluated rest can be split as `chunks` requires. 0 with chunks under 3 tokens."""
    if chunk < 3 or n < 2:
        return 0
    r = min(match, n - 1)
    if (n - 1) % chunk == 0:  # the uncached prefill runs the last token alone: so must we
        if r == n - 2:
            r -= 1  # n-2 would leave a second lone token before it
    elif r == n - 1:
        r -= 1  # the last token must run with at least one other
    return max(r, 0)


def chunks(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """The runs [a, b) that prefill positions start..n, at most `chunk` tokens each.
    No run is a single token except the last one when an uncached prefill (chunks from
    0) also ends with the last token alone; from 0 these are exactly the plain chunks.
    Positions computed in runs of two or more get the same KV whatever the run (module
    doc), so a prompt prefilled from a reused prefix ends as it would uncached.
    `start` must come from `reusable`."""
    if chunk < 3:
        return [(s, min(n, s + chunk)) for s in range(start, n, chunk)]
    end = n - 1 if (n - 1) % chunk == 0 else n
    out = []
    s = start
    while s < end:
        e = min(end, s + chunk)
        if end - e == 1:
            e -= 1  # leave two for the last run rather than one
        out.append((s, e))
        s = e
    if end < n:
        out.append((end, n))
    return out


def exact_length(n: int, chunk: int) -> int:
    """Of a prompt of n tokens prefilled by `chunks`, the leading positions whose KV any
    other prefill of the same tokens reproduces exactly: all but a last token that ran
    alone."""
    if chunk < 3:
        return 0
    return n - 1 if (n - 1) % chunk == 0 else n


_libc = None


def discard(view: np.ndarray) -> None:
    """Give the pages inside a contiguous array view back to the kernel. The mapping
    stays: the pages read as zeros and are backed again when written. Only whole pages
    inside the view are released, so neighbouring data is never touched."""
    global _libc
    if view.size == 0:
        return
    if not view.flags.c_contiguous:
        raise ValueError("discard needs a contiguous view")
    page = mmap.PAGESIZE
    start = view.ctypes.data
    end = start + view.nbytes
    lo = -(-start // page) * page
    hi = end // page * page
    if hi <= lo:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(lo, hi - lo, MADV_DONTNEED)
    except (OSError, AttributeError):  # not Linux/glibc: the pages stay until the buffer goes
        pass


@dataclass(eq=False)
class Pinned:
    tokens: tuple[int, ...]
    kv: list[np.ndarray] | None = None  # per layer key, value: [kv_heads, len, head_dim]; None until filled
    used: int = 0  # recency stamp

    @property
    def filled(self) -> bool:
        return self.kv is not None


@dataclass(eq=False)
class PrefixCache:
    """The budget and the pinned prefixes, shared by the batches of one scheduler.

    `size_mb` is read on every use (a callable for a live setting); `keep` scales it
    (the governor sets it under memory pressure). Pinned copies belong to one
    onnxruntime session: `bind` drops them when another session asks (a reloaded
    model, or a throttle rebuild with another thread count)."""

    size_mb: Callable[[], float] | float = 32
    keep: float = 1.0
    pins: list[Pinned] = field(default_factory=list)
    _session: Any = None  # weak reference: a cache must not keep an unloaded model alive
    _clock: Any = field(default_factory=itertools.count)

    @property
    def limit_bytes(self) -> int:
        mb = self.size_mb() if callable(self.size_mb) else self.size_mb
        return max(0, int(float(mb) * MB * max(0.0, min(1.0, self.keep))))

    @property
    def pinned_bytes(self) -> int:
        return sum(p.kv[0].nbytes * len(p.kv) for p in self.pins if p.kv is not None)

    def stamp(self) -> int:
        return next(self._clock)

    def bind(self, session: Any) -> None:
        """Pinned copies are valid only for the session that computed them."""
        if self._session is None or self._session() is not session:
            self.clear()
            self._session = weakref.ref(session)

    def clear(self) -> None:
        """Drop every pinned copy (the pins stay wanted and fill again)."""
        for p in self.pins:
            p.kv = None
        self._session = None

    def set_pins(self, token_lists: Iterable[Sequence[int]]) -> None:
        """The prefixes to pin; filled copies of those still wanted are kept."""
        want = []
        for t in token_lists:
            t = tuple(t)
            if t and t not in want:
                want.append(t)
        have = {p.tokens: p for p in self.pins}
        self.pins = [have.get(t) or Pinned(t) for t in want]

    def best(self, tokens: Sequence[int]) -> tuple[Pinned | None, int]:
        """The filled pinned prefix sharing the most leading tokens with `tokens`."""
        best, n = None, 0
        for p in self.pins:
            if p.kv is not None:
                m = common_prefix(p.tokens, tokens)
                if m > n:
                    best, n = p, m
        return best, n

    def wanted(self, tokens: Sequence[int], exact: int) -> list[Pinned]:
        """Unfilled pins that are a prefix of `tokens` within its first `exact` positions."""
        return [p for p in self.pins
                if p.kv is None and len(p.tokens) <= exact and tuple(tokens[: len(p.tokens)]) == p.tokens]

    def fill(self, pin: Pinned, row: list[np.ndarray], kv_bytes: int) -> bool:
        """Copy the first len(pin.tokens) positions of a batch row (per layer key and
        value, [kv_heads, capacity, head_dim]) into the pin, evicting the least recently
        used pinned copies if needed. False when it cannot fit the budget."""
        need = kv_bytes * len(pin.tokens)
        limit = self.limit_bytes
        if need > limit:
            return False
        filled = sorted((p for p in self.pins if p.kv is not None), key=lambda p: p.used)
        while filled and self.pinned_bytes + need > limit:
            filled.pop(0).kv = None
        n = len(pin.tokens)
        kv = []
        for buf in row:
            copy = lazy_zeros((buf.shape[0], n, buf.shape[2]), buf.dtype)
            copy[...] = buf[:, :n]
            kv.append(copy)
        pin.kv = kv
        pin.used = self.stamp()
        return True

    def fit(self, limit: int | None = None) -> None:
        """Drop least recently used pinned copies until they fit `limit` (default: the budget)."""
        limit = self.limit_bytes if limit is None else limit
        filled = sorted((p for p in self.pins if p.kv is not None), key=lambda p: p.used)
        while filled and self.pinned_bytes > limit:
            filled.pop(0).kv = None

    def describe(self) -> dict:
        return {"limit_bytes": self.limit_bytes, "pinned_bytes": self.pinned_bytes,
                "pins": len(self.pins), "pins_filled": sum(p.kv is not None for p in self.pins)}


PROBES = ("a", "Z", "7", "?")


def system_prefix(engine, system: str) -> tuple[int, ...]:
    """The tokens every request with this system prompt starts with: the rendered
    system turn and what the template puts before the user's text (the longest
    common prefix of renderings with different user texts)."""
    from edged.engine.request import GenerateRequest

    seqs = [list(engine.prompt_tokens(GenerateRequest(prompt=probe, system=system))) for probe in PROBES]
    n = min(common_prefix(seqs[0], s) for s in seqs[1:])
    return tuple(seqs[0][:n])
