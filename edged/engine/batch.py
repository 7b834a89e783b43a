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
    def __init__(self, engine: Engine, *, slots: int = 4, capacity: int | None = None, initial: int = 256):
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
        # Copy only what active rows hold: the new pages stay unbacked until written, so
        # copying whole (mostly empty) rows would make every slot's cache resident.
        for new, prev in zip(self._kv, old):
            for b, slot in self.active.items():
                new[b, :, : slot.length] = prev[b, :, : slot.length]
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
        """Prefill a request into a free slot (runs the prompt now). Past `deadline`
        (time.monotonic()) it makes no further token and ends with done_reason "deadline"."""
        if prepared.capacity > self.max_capacity:
            raise ContextOverflow(
                f"request needs {prepared.capacity} tokens of context; batched slots hold {self.max_capacity}"
            )
        b = next(i for i in range(self.slots) if i not in self.active)
        eng = self.engine
        t0 = time.perf_counter_ns()
        n = len(prepared.tokens)
        # room for the prompt and the first INITIAL_ROOM tokens at once, as a single
        # Sequence gets: growing later copies the cache and holds both copies meanwhile
        self._ensure(max(n + 1, min(prepared.capacity, n + INITIAL_ROOM)))
        with eng.lock:
            load_ns, eng._unreported_load = eng._unreported_load, 0
            io = self._row_io[b]
            chunk = eng.runner.config.prefill_chunk  # as Sequence.forward: bounded prefill scratch
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                eng.runner.bind_tokens(io, np.asarray([prepared.tokens[start:end]], dtype=np.int64))
                io.bind_cpu_input("attention_mask", np.ones((1, end), dtype=np.int64))
                eng.runner.session.run_with_iobinding(io)
        t1 = time.perf_counter_ns()
        slot = Slot(Decoder(eng, prepared, cancel, deadline=deadline), on_delta, on_done, length=n, t_start=t0, t_prompt=t1 - t0, t_eval_start=t1, load_ns=load_ns)
        self.active[b] = slot
        self._consume(b, slot, self._row_logits[b][0, -1])
        return b

    def _consume(self, b: int, slot: Slot, logits: np.ndarray, expect: int | None = None) -> None:
        dec = slot.decoder
        delta, tok = dec.advance(logits) if expect is None else dec.advance(logits, expect)
        if delta:
            slot.on_delta(delta)
        if tok is None:
            del self.active[b]
            if not self.active and self.capacity > self.initial:
                # Drained: give the grown cache back. Rows keep the pages their requests
                # wrote, so a long-lived batch would otherwise end up with every slot's
                # cache resident at the largest size it ever had.
                self._allocate(self.initial)
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
        total = max(s.length for s in self.active.values()) + 1
        self._ensure(total)
        ids = np.zeros((self.slots, 1), dtype=np.int64)
        mask = np.zeros((self.slots, total), dtype=np.int64)
        mask[:, 0] = 1  # free rows: a dummy token at position 0 of their own row
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
