"""Continuous batching: several requests decode together, one token per step.

Decoding one token is memory-bound: every step streams all weights through the
CPU. Stepping B sequences in one run reads the weights once for all of them, so
aggregate tokens/s grows with B while each stream slows only a little.

Layout: one key and one value buffer per layer of shape [slots, kv_heads,
capacity, head_dim]; slot b owns row b. A new request is prefilled alone on row
views of the buffers (a row of a C-ordered array is contiguous, so onnxruntime
writes into it in place), then joins the shared decode step. The decode step
runs every slot: rows are right-padded through attention_mask, whose per-row sum
gives GroupQueryAttention each row's own length. A free slot is fed a dummy token
at position 0 of its own row, which the next prefill overwrites.

With a prefix cache (engine/prefix.py), a slot whose request ended keeps the KV of
that request's prompt (`kept`): its dummy token goes just after the kept positions,
and a new request takes the free slot sharing the longest prefix with its prompt,
or a copy of a pinned prefix, and prefills only the rest.

The cache starts small and doubles when a row needs more room (active rows are
copied and the bindings renewed between steps), up to the model's context length;
when the last request leaves, it goes back to its initial size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from edged.engine.engine import INITIAL_ROOM, Decoder, Engine, Prepared
from edged.engine.prefix import PrefixCache, chunks, common_prefix, discard, exact_length, reusable
from edged.engine.lookup import MAX_DRAFT
from edged.engine.runner import LogitRows, lazy_zeros
from edged.errors import ContextOverflow


@dataclass
class Slot:
    decoder: Decoder
    on_delta: Callable[[str], None]
    on_done: Callable[[dict], None]
    length: int = 0  # tokens in this row's cache
    next_token: int = 0
    t_start: int = 0
    t_prompt: int = 0
    t_eval_start: int = 0
    load_ns: int = 0


class BatchDecoder:
    def __init__(self, engine: Engine, *, slots: int = 4, capacity: int | None = None, initial: int = 256,
                 prefix: PrefixCache | None = None):
        self.engine = engine
        self.slots = slots
        self.max_capacity = capacity or engine.context_length
        info = engine.info
        sess = engine.runner.session
        self._session = sess
        self._logits = np.zeros((slots, 1, info.vocab_size), np.float32)
        self._row_logits = [np.zeros((1, 1, info.vocab_size), np.float32) for _ in range(slots)]
        self._io = sess.io_binding()
        self._row_io = [sess.io_binding() for _ in range(slots)]
        self._io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        for b in range(slots):
            self._row_io[b].bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._row_logits[b]))
        # A request decoding alone takes speculative steps on its row's bindings (engine/lookup.py).
        self._rows = LogitRows(info.vocab_size, MAX_DRAFT + 1) if engine.runner.multi_logits else None
        self._kv: list[np.ndarray] = []
        self.active: dict[int, Slot] = {}
        # Prefix cache (None: off). kept[b]: the prompt tokens whose KV free row b still
        # holds, at most capacity - 1 of them (the dummy token of a step goes after them).
        self.prefix = prefix
        self.kept: dict[int, list[int]] = {}
        self._kept_used: dict[int, int] = {}
        if prefix is not None:
            prefix.bind(sess)
        self.capacity = 0
        self.initial = min(initial, self.max_capacity)
        self._allocate(self.initial)

    def serves(self, engine: Engine) -> bool:
        """Whether these bindings belong to the engine's current session. An idle
        batch first lets the runner apply a pending rebuild (ops/throttle.py)."""
        if not self.active:
            engine.runner.refresh()
        return self.engine is engine and self._session is engine.runner.session

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate the shared cache with `capacity` positions per row, keeping
        what the active rows hold. It starts small and doubles on demand: onnxruntime's
        attention scratch grows with the bound cache length (see runner.Sequence)."""
        info = self.engine.info
        old = self._kv
        shape = (self.slots, info.num_kv_heads, capacity, info.head_dim)
        self._kv = [lazy_zeros(shape) for _ in range(2 * info.num_layers)]
        # Copy only what active and kept rows hold: the new pages stay unbacked until written, so
        # copying whole (mostly empty) rows would make every slot's cache resident.
        for b in list(self.kept):  # shrinking: a kept prompt keeps what fits (a prefix is still one)
            if len(self.kept[b]) >= capacity:
                del self.kept[b][capacity - 1 :]
            if not self.kept[b]:
                del self.kept[b]
        for new, prev in zip(self._kv, old):
            for b, slot in self.active.items():
                new[b, :, : slot.length] = prev[b, :, : slot.length]
            for b, toks in self.kept.items():
                new[b, :, : len(toks)] = prev[b, :, : len(toks)]
        for i in range(info.num_layers):
            for j, kind in enumerate(("key", "value")):
                buf = self._kv[2 * i + j]
                whole = ort.OrtValue.ortvalue_from_numpy(buf)
                self._io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", whole)
                self._io.bind_ortvalue_output(f"present.{i}.{kind}", whole)
                for b in range(self.slots):
                    row = ort.OrtValue.ortvalue_from_numpy(buf[b : b + 1])
                    self._row_io[b].bind_ortvalue_input(f"past_key_values.{i}.{kind}", row)
                    self._row_io[b].bind_ortvalue_output(f"present.{i}.{kind}", row)
        self.capacity = capacity

    def _ensure(self, needed: int) -> None:
        if needed > self.capacity:
            self._allocate(min(max(needed, 2 * self.capacity), self.max_capacity))

    @property
    def free(self) -> int:
        return self.slots - len(self.active)

    def add(
        self,
        prepared: Prepared,
        *,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
        on_delta: Callable[[str], None],
        on_done: Callable[[dict], None],
    ) -> int:
        """Prefill a request into a free slot (runs the prompt now, or only the part the
        prefix cache does not hold). Past `deadline` (time.monotonic()) it makes no
        further token and ends with done_reason "deadline"."""
        if prepared.capacity > self.max_capacity:
            raise ContextOverflow(
                f"request needs {prepared.capacity} tokens of context; batched slots hold {self.max_capacity}"
            )
        eng = self.engine
        t0 = time.perf_counter_ns()
        tokens = prepared.tokens
        n = len(tokens)
        chunk = eng.runner.config.prefill_chunk  # as Sequence.forward: bounded prefill scratch
        # room for the prompt and the first INITIAL_ROOM tokens at once, as a single
        # Sequence gets: growing later copies the cache and holds both copies meanwhile
        self._ensure(max(n + 1, min(prepared.capacity, n + INITIAL_ROOM)))
        b, reuse, pin = self._choose(tokens, chunk)
        with eng.lock:
            load_ns, eng._unreported_load = eng._unreported_load, 0
            if pin is not None:
                for buf, src in zip(self._kv, pin.kv):
                    buf[b, :, :reuse] = src[:, :reuse]
            io = self._row_io[b]
            for start, end in chunks(reuse, n, chunk):
                eng.runner.bind_tokens(io, np.asarray([tokens[start:end]], dtype=np.int64))
                io.bind_cpu_input("attention_mask", np.ones((1, end), dtype=np.int64))
                eng.runner.session.run_with_iobinding(io)
        t1 = time.perf_counter_ns()
        if self.prefix is not None:
            self._pin_from(b, tokens, chunk)
        decoder = Decoder(eng, prepared, cancel, deadline=deadline)
        decoder.cached = reuse
        slot = Slot(decoder, on_delta, on_done, length=n, t_start=t0, t_prompt=t1 - t0, t_eval_start=t1, load_ns=load_ns)
        self.active[b] = slot
        self._consume(b, slot, self._row_logits[b][0, -1])
        return b

    # -- prefix cache -------------------------------------------------------------
    def _choose(self, tokens: list[int], chunk: int):
        """The free slot for a new prompt, how many leading tokens it need not prefill,
        and the pinned prefix to copy them from (None: the slot's row holds them)."""
        free = [i for i in range(self.slots) if i not in self.active]
        if self.prefix is None:
            return free[0], 0, None
        n = len(tokens)
        match = {i: common_prefix(self.kept.get(i, ()), tokens) for i in free}
        best = max(free, key=lambda i: match[i])
        pin, pin_match = self.prefix.best(tokens)
        from_slot = reusable(match[best], n, chunk)
        from_pin = reusable(pin_match, n, chunk)
        if from_slot > 0 and from_slot >= from_pin:
            b, reuse, pin = best, from_slot, None
        else:
            # an empty row first, else the least recently used kept one
            b = min(free, key=lambda i: (i in self.kept, self._kept_used.get(i, -1)))
            reuse = from_pin if pin is not None else 0
            if reuse == 0:
                pin = None
            else:
                pin.used = self.prefix.stamp()
        self.kept.pop(b, None)
        self._kept_used.pop(b, None)
        return b, reuse, pin

    def _pin_from(self, b: int, tokens: list[int], chunk: int) -> None:
        """Fill the pinned prefixes this prompt covers from its freshly prefilled row."""
        for pin in self.prefix.wanted(tokens, exact_length(len(tokens), chunk)):
            if self.prefix.fill(pin, [buf[b] for buf in self._kv], self.engine.info.kv_bytes(1)):
                self._fit_kept(self.prefix.limit_bytes - self.prefix.pinned_bytes)

    def _keep(self, b: int, slot: Slot) -> None:
        """A request left row b: keep the KV of its prompt (within the budget, evicting
        the least recently used kept rows first) and release the rest of the row."""
        per_token = self.engine.info.kv_bytes(1)
        tokens = slot.decoder.p.tokens
        n = min(exact_length(len(tokens), self.engine.runner.config.prefill_chunk), self.capacity - 1)
        room = self.prefix.limit_bytes - self.prefix.pinned_bytes
        self._fit_kept(room - n * per_token)
        n = max(0, min(n, (room - self.kept_bytes) // per_token))
        if n > 0:
            self.kept[b] = list(tokens[:n])
            self._kept_used[b] = self.prefix.stamp()
        self._release(b, n)

    @property
    def kept_bytes(self) -> int:
        """KV bytes the free rows keep for reuse."""
        return sum(len(t) for t in list(self.kept.values())) * self.engine.info.kv_bytes(1)

    def _fit_kept(self, room: int) -> None:
        """Forget the least recently used kept rows until the rest take at most `room` bytes."""
        for b in sorted(self.kept, key=lambda i: self._kept_used.get(i, -1)):
            if self.kept_bytes <= room:
                break
            del self.kept[b]
            self._kept_used.pop(b, None)
            self._release(b, 0)

    def _release(self, b: int, keep: int) -> None:
        """Give back the pages of row b beyond its first `keep` positions."""
        for buf in self._kv:
            if keep == 0:
                discard(buf[b])
            else:
                for h in range(buf.shape[1]):
                    discard(buf[b, h, keep:])

    def fit_prefix_cache(self) -> None:
        """Hold no more than the prefix cache's budget now (it may have been lowered):
        drop the least recently used pinned copies, then kept rows."""
        if self.prefix is None:
            return
        self.prefix.fit()
        self._fit_kept(self.prefix.limit_bytes - self.prefix.pinned_bytes)

    def _consume(self, b: int, slot: Slot, logits: np.ndarray, expect: int | None = None) -> None:
        dec = slot.decoder
        delta, tok = dec.advance(logits) if expect is None else dec.advance(logits, expect)
        if delta:
            slot.on_delta(delta)
        if tok is None:
            del self.active[b]
            if self.prefix is not None:
                self._keep(b, slot)
            if not self.active and self.capacity > self.initial:
                # Drained: give the grown cache back. Rows keep the pages their requests
                # wrote, so a long-lived batch would otherwise end up with every slot's
                # cache resident at the largest size it ever had. Kept prefixes stay:
                # the cache shrinks to the smallest doubling of the initial size above them.
                target = self.initial
                while target <= max(map(len, self.kept.values()), default=0) and target < self.capacity:
                    target *= 2
                if target < self.capacity:
                    self._allocate(target)
            now = time.perf_counter_ns()
            slot.on_done(
                slot.decoder.stats(
                    prompt_ns=slot.t_prompt,
                    eval_ns=now - slot.t_eval_start,
                    load_ns=slot.load_ns,
                    total_ns=now - slot.t_start + slot.load_ns,
                )
            )
        else:
            slot.next_token = tok

    def step(self) -> int:
        """Advance every active request by one token; return how many were active."""
        if not self.active:
            return 0
        if len(self.active) == 1:
            ((b, s),) = self.active.items()
            self._solo(b, s, s.decoder.draft() if self._rows is not None else [])
            return 1
        eng = self.engine
        total = max([s.length for s in self.active.values()] + [len(t) for t in self.kept.values()]) + 1
        self._ensure(total)
        ids = np.zeros((self.slots, 1), dtype=np.int64)
        mask = np.zeros((self.slots, total), dtype=np.int64)
        mask[:, 0] = 1  # free rows: a dummy token at position 0 of their own row
        for b, kept in self.kept.items():
            mask[b, : len(kept) + 1] = 1  # or just after what they keep
        for b, s in self.active.items():
            ids[b, 0] = s.next_token
            mask[b, : s.length + 1] = 1
        with eng.lock:
            eng.runner.bind_tokens(self._io, ids)
            self._io.bind_cpu_input("attention_mask", mask)
            eng.runner.session.run_with_iobinding(self._io)
        n = len(self.active)
        for b, s in list(self.active.items()):
            s.length += 1
            self._consume(b, s, self._logits[b, -1])
        return n

    def _solo(self, b: int, s: Slot, draft: list[int]) -> None:
        """The step of the only active request, on its own row's bindings: the shared step
        would run every slot's row (measured: a lone request in a 4-slot batch decoded at
        half the tokens/s of a 1-slot batch on a busy 2-core machine). With a draft
        (engine/lookup.py), its next token and the draft run in one pass and advance()
        goes over the rows until a draft token is not the one chosen; the row's length
        drops back over the rejected positions. Several active requests take the shared
        step instead (one token each)."""
        eng = self.engine
        m = len(draft)
        self._ensure(s.length + m + 1)
        io = self._row_io[b]
        with eng.lock:
            rows = self._rows.bind(io, m + 1) if m else self._row_logits[b][0]
            try:
                eng.runner.bind_tokens(io, np.asarray([[s.next_token, *draft]], dtype=np.int64))
                io.bind_cpu_input("attention_mask", np.ones((1, s.length + m + 1), dtype=np.int64))
                eng.runner.session.run_with_iobinding(io)
            finally:
                if m:
                    self._rows.unbind(io, ort.OrtValue.ortvalue_from_numpy(self._row_logits[b]))
        s.length += m + 1
        for i in range(m + 1):
            expect = draft[i] if i < m else None
            self._consume(b, s, rows[i], expect)
            if self.active.get(b) is not s:
                return  # done
            if expect is None or s.next_token != expect:
                s.length -= m - i  # the positions after the first rejected one
                return
