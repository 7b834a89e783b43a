"""Changing the number of cores inference uses while the model stays loaded.

onnxruntime fixes `intra_op_num_threads` when a session is created. Measured on
the SmolLM2 int8 model (onnxruntime 1.32, see docs/operations.md):

- a second session (another thread count) costs a second copy of the weights:
  MatMulNBits prepacks its int8 blocks into session-private buffers (RSS
  251 -> 431 MiB). Handing both sessions the same initializers via
  `SessionOptions.add_initializer` does not help (the prepacked copies are
  still per session, 654 MiB); `session.disable_prepacking` keeps one mmap'd
  copy but makes a decode step 50x slower. The C API's
  PrepackedWeightsContainer, which would share them, is not in the Python API.
- so the core count is changed *between tokens* with CPU affinity: the session
  keeps its pool of N threads, and every thread of the process (the pool, the
  worker that calls run(), the transports) is pinned to the first n allowed
  cores. Work-stealing in onnxruntime's pool keeps n cores busy; the CPU time
  the process can burn per second is capped at n. Nothing is reallocated:
  resident memory does not change (measured in tests/ops/test_throttle.py).
- `mode="rebuild"` additionally recreates the session with n intra-op threads
  when the next generation starts (at idle: a live Sequence holds bindings of
  the old session). The old session is released *before* the new one is
  built, so memory never holds two copies; the price is a reload (~1 s for
  SmolLM2 here) at the start of that request.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading

import onnxruntime as ort

from edged.engine.runner import EngineConfig, GraphInfo, Runner, open_session

log = logging.getLogger("edged.throttle")


class CpuCap:
    """Pins every thread of this process to the first n of the originally allowed CPUs."""

    def __init__(self):
        self.allowed = sorted(os.sched_getaffinity(0))
        self.n = len(self.allowed)

    def apply(self, n: int) -> list[int]:
        n = max(1, min(n, len(self.allowed)))
        cpus = set(self.allowed[:n])
        for tid in _tids():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that just exited
                pass
        self.n = n
        return sorted(cpus)

    def reset(self) -> None:
        self.apply(len(self.allowed))


def _tids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


class ThrottledRunner(Runner):
    """A Runner whose core count can change while loaded. See the module doc."""

    def __init__(self, model_path: str, info: GraphInfo, config: EngineConfig, *, mode: str = "affinity",
                 cap: CpuCap | None = None, session: ort.InferenceSession | None = None, embedding=None):
        if mode not in ("affinity", "rebuild"):
            raise ValueError("mode must be affinity or rebuild")
        self.model_path = model_path
        self.mode = mode
        self.cap = cap or CpuCap()
        self.max_threads = config.effective_threads
        self.threads = self.max_threads
        self._built_threads = self.max_threads
        self._pending: int | None = None
        self._lock = threading.Lock()
        super().__init__(model_path, info, config, session=session, embedding=embedding)

    @classmethod
    def adopt(cls, runner: Runner, model_path: str, **kwargs) -> "ThrottledRunner":
        """Wrap an engine's existing session (no reload, no second copy)."""
        return cls(model_path, runner.info, runner.config, session=runner.session, embedding=runner.embedding, **kwargs)

    def set_threads(self, n: int) -> None:
        """Use n cores from now on (takes effect before the next token)."""
        n = max(1, min(n, self.max_threads))
        with self._lock:
            if n == self.threads:
                return
            log.info("inference cores %d -> %d (%s)", self.threads, n, self.mode)
            self.threads = n
            self.cap.apply(n)
            if self.mode == "rebuild" and n != self._built_threads:
                self._pending = n

    def refresh(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._rebuild(self._pending)
                self._pending = None

    def _rebuild(self, n: int) -> None:
        cfg = dataclasses.replace(self.config, threads=n)
        self.session = None  # drop the old copy first: never two in memory
        gc.collect()
        self.session = open_session(self.model_path, cfg)
        self._built_threads = n
        self.cap.apply(self.threads)  # the new pool threads inherit our mask; re-pin all


def throttle_engine(engine, **kwargs) -> ThrottledRunner:
    """Give a loaded Engine a ThrottledRunner around its own session."""
    if isinstance(engine.runner, ThrottledRunner):
        return engine.runner
    engine.runner = ThrottledRunner.adopt(engine.runner, str(engine.model.file("model")), **kwargs)
    return engine.runner
