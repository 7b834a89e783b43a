"""One inference worker per loaded model, fed by a bounded priority queue.

Generation is CPU-bound and the board has 2-4 cores, so requests run one at a
time on a single worker thread; transports only enqueue `Job`s and receive
frames back through the job's `emit` callable (called on the worker thread).

Seams for later work (the thermal/memory governor):
- `admission_hooks`: callables `(job) -> None | EdgedError`, run at submit;
  return e.g. `Busy(..., retry_after_ms=...)` to refuse work.
- `token_hooks`: callables `(job, n_tokens) -> None`, run between tokens on the
  worker thread; they may sleep to pace generation.
"""

from __future__ import annotations

import collections
import gc
import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from edged.errors import Busy, Cancelled, DeadlineExceeded, DuplicateRequest, EdgedError, ShuttingDown
from edged.serve import protocol
from edged.serve.protocol import Frame

log = logging.getLogger("edged.scheduler")

Emit = Callable[[dict, bool], None]  # (frame, final)


@dataclass(eq=False)
class Job:
    frame: Frame
    emit: Emit
    scope: str = ""  # who may cancel it by id: "unix:<conn>" or "mqtt:<reply topic>"
    deadline: float | None = None  # time.monotonic() after which it must not start
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "new"  # new | queued | running | done
    seq: int = 0

    @property
    def id(self) -> Any:
        return self.frame.id

    def finish(self, frame: dict) -> None:
        # Exactly one final frame per job, whoever gets there first.
        if self.state == "done":
            return
        self.state = "done"
        try:
            self.emit(frame, True)
        except Exception:  # a transport that went away must not kill the worker
            log.exception("emit failed for request %r", self.id)


class Scheduler:
    def __init__(
        self,
        loader: Callable[[], Any],
        *,
        queue_size: int = 16,
        keep_alive: float = 300.0,
        retry_after_ms: int = 1000,
        engine: Any = None,
        batch_size: int = 1,
    ):
        self.loader = loader  # () -> Engine; called again after an idle unload
        # >1: up to batch_size requests decode together (engine/batch.py); 1: one at a time
        self.batch_size = batch_size
        self._batch = None  # BatchDecoder bound to the current engine
        self.active: list[Job] = []  # running jobs, oldest first (batched mode)
        self.queue_size = queue_size
        self.keep_alive = keep_alive
        self.retry_after_ms = retry_after_ms
        self.admission_hooks: list[Callable[[Job], EdgedError | None]] = []
        self.token_hooks: list[Callable[[Job, int], None]] = []
        self.engine = engine
        self.model_name: str | None = engine.model.name if engine is not None else None
        self._heap: list[tuple[int, int, Job]] = []
        self._jobs: dict[tuple[str, str], Job] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._stopping = False
        self.running: Job | None = None
        self.recent: collections.deque = collections.deque(maxlen=16)  # (eval_count, eval_ns, total_ns)
        self.completed = 0
        self._last_used = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="edged-worker", daemon=True)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop admitting; what is queued still runs (see drain)."""
        with self._cv:
            self._closed = True

    def drain(self, grace: float) -> None:
        """Let queued and running work finish for up to `grace` seconds, then cancel
        the rest; every waiting client gets a final frame. Blocks."""
        end = time.monotonic() + grace
        with self._cv:
            self._closed = True
            while (self._heap or self.running) and time.monotonic() < end:
                self._cv.wait(timeout=max(0.0, min(0.5, end - time.monotonic())))
            leftovers = [j for _, _, j in self._heap]
            self._heap.clear()
            self._stopping = True
            for job in [self.running, *self.active]:
                if job is not None:
                    job.cancel.set()
            self._cv.notify_all()
        for job in leftovers:
            self._forget(job)
            job.finish(protocol.error_frame(job.id, ShuttingDown("the daemon is shutting down")))
        self._thread.join(timeout=max(5.0, grace))

    # -- submission ------------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue a job; returns its queue position (1 = next). Raises Busy,
        ShuttingDown or DeadlineExceeded without queueing."""
        for hook in self.admission_hooks:
            err = hook(job)
            if err is not None:
                raise err
        with self._cv:
            if self._closed:
                raise ShuttingDown("the daemon is shutting down")
            if job.deadline is not None and time.monotonic() >= job.deadline:
                raise DeadlineExceeded("the request expired before it was queued")
            key = (job.scope, job.frame.key)
            if job.frame.id is not None and key in self._jobs:
                raise DuplicateRequest(f"request id {job.id!r} is already queued or running", field="id")
            if len(self._heap) >= self.queue_size:
                raise Busy(
                    f"queue full ({len(self._heap)} waiting); retry later",
                    retry_after_ms=self._retry_after(len(self._heap) + 1),
                    queue_position=len(self._heap) + 1 + (self.running is not None),
                )
            job.seq = next(self._seq)
            job.state = "queued"
            heapq.heappush(self._heap, (-job.frame.priority, job.seq, job))
            if job.frame.id is not None:
                self._jobs[key] = job
            self._cv.notify_all()
            return 1 + sum(1 for p, s, _ in self._heap if (p, s) < (-job.frame.priority, job.seq))

    def cancel(self, scope: str, rid: Any) -> bool:
        with self._cv:
            job = self._jobs.get((scope, str(rid)))
            if job is None:
                return False
            if job.state == "queued":
                self._heap = [e for e in self._heap if e[2] is not job]
                heapq.heapify(self._heap)
                self._jobs.pop((scope, job.frame.key), None)
                self._cv.notify_all()
            else:
                job.cancel.set()  # the worker stops at the next token and sends the final frame
                return True
        job.finish(protocol.error_frame(job.id, Cancelled("cancelled before it started")))
        return True

    def cancel_any(self, rid: Any, scope_prefix: str) -> bool:
        """Cancel by id among the scopes starting with scope_prefix (MQTT: any reply topic)."""
        with self._cv:
            scopes = [s for (s, k) in self._jobs if k == str(rid) and s.startswith(scope_prefix)]
        return any([self.cancel(s, rid) for s in scopes])

    def cancel_scope(self, scope: str) -> int:
        """Cancel everything a connection submitted (it disconnected)."""
        with self._cv:
            ids = [j.id for (s, _), j in self._jobs.items() if s == scope]
        return sum(self.cancel(scope, rid) for rid in ids)

    # -- introspection ---------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._heap)

    def tokens_per_second(self) -> float | None:
        n = sum(r[0] for r in self.recent)
        ns = sum(r[1] for r in self.recent)
        return round(n / (ns / 1e9), 2) if ns else None

    def _retry_after(self, ahead: int) -> int:
        if self.recent:
            avg_ms = sum(r[2] for r in self.recent) / len(self.recent) / 1e6
            return max(1, int(avg_ms * ahead))
        return self.retry_after_ms

    def _forget(self, job: Job) -> None:
        with self._cv:
            if self._jobs.get((job.scope, job.frame.key)) is job:
                del self._jobs[(job.scope, job.frame.key)]

    # -- the worker --------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._cv:
            while not self._heap and not self._stopping:
                self._idle_wait()
            if self._stopping:
                return None
            _, _, job = heapq.heappop(self._heap)
            self.running = job
            job.state = "running"
            return job

    def _idle_wait(self) -> None:
        """Wait for work (self._cv held); unload the model once it has been idle for keep_alive."""
        timeout = None
        if self.engine is not None and self.keep_alive >= 0:
            timeout = max(0.0, self._last_used + self.keep_alive - time.monotonic())
            if timeout == 0.0:
                self._unload()
                return
        self._cv.wait(timeout=timeout)

    def _ready_engine(self, job: Job):
        """Last checks before a job runs, and the engine it runs on (reloaded after an idle unload)."""
        if job.cancel.is_set():
            raise Cancelled("cancelled before it started")
        if job.deadline is not None and time.monotonic() >= job.deadline:
            raise DeadlineExceeded("the request expired while it waited in the queue; it was not run")
        if self.engine is None:
            log.info("loading model %s", self.model_name or "")
            self.engine = self.loader()
            self.model_name = self.engine.model.name
        return self.engine

    def _unload(self) -> None:
        log.info("model %s idle for %.0fs: unloaded (reloads on the next request)", self.model_name, self.keep_alive)
        self.engine = None
        self._batch = None  # its buffers and bindings hold the session too
        gc.collect()

    def _run(self) -> None:
        if self.batch_size > 1:
            return self._run_batched()
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._execute(job)
            except EdgedError as e:
                job.finish(protocol.error_frame(job.id, e))
            except Exception as e:
                log.exception("request %r failed", job.id)
                job.finish(protocol.error_frame(job.id, e))
            finally:
                self._forget(job)
                with self._cv:
                    self.running = None
                    self._last_used = time.monotonic()
                    if self.keep_alive == 0 and self.engine is not None and not self._heap:
                        self._unload()
                    self._cv.notify_all()

    def _execute(self, job: Job) -> None:
        engine = self._ready_engine(job)
        f = job.frame
        t_start = time.monotonic()
        gen = engine.generate(f.gen, cancel=job.cancel)  # template + tokenize + context check
        prepare_ns = int((time.monotonic() - t_start) * 1e9)
        n = 0
        for delta in gen:
            n += 1
            if f.stream:
                job.emit(protocol.delta_frame(job.id, delta, n), False)
            for hook in self.token_hooks:
                hook(job, n)
        job.finish(self._final_frame(job, engine, gen.text, gen.stats, prepare_ns, t_start))

    def _final_frame(self, job: Job, engine, text: str, stats: dict, prepare_ns: int, t_start: float) -> dict:
        # Like Ollama, total_duration covers templating and tokenization too; queue_duration is our addition.
        s = dict(stats)
        s["total_duration"] += prepare_ns
        s["queue_duration"] = int((t_start - job.enqueued) * 1e9)
        self.recent.append((s["eval_count"], s["eval_duration"], s["total_duration"]))
        self.completed += 1
        return protocol.final_frame(job.id, model=engine.model.name, text=text, stats=s, chat=job.frame.op == "chat")

    # -- the batched worker ---------------------------------------------------------
    # Decoding is memory-bound, so one run that advances every active request by a
    # token costs little more than a run for one. New requests are prefilled into
    # free slots between steps (continuous batching, as llama.cpp's server does).
    def _run_batched(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self.active and not self._stopping:
                    self._idle_wait()
                if self._stopping and not self.active:
                    return
                admit = []
                while self._heap and not self._stopping and len(self.active) + len(admit) < self.batch_size:
                    _, _, job = heapq.heappop(self._heap)
                    job.state = "running"
                    admit.append(job)
                self.active.extend(admit)
                self.running = self.active[0] if self.active else None
            for job in admit:
                try:
                    self._start_batched(job)
                except EdgedError as e:
                    self._end_batched(job, protocol.error_frame(job.id, e))
                except Exception as e:
                    log.exception("request %r failed", job.id)
                    self._end_batched(job, protocol.error_frame(job.id, e))
            batch = self._batch
            if batch is not None and batch.active:
                try:
                    batch.step()
                except Exception as e:  # the session failed: every request in the batch gets an error
                    log.exception("batched step failed")
                    for job in list(self.active):
                        self._end_batched(job, protocol.error_frame(job.id, e))
                    self._batch = None

    def _start_batched(self, job: Job) -> None:
        from edged.engine.batch import BatchDecoder

        engine = self._ready_engine(job)
        if self._batch is None or self._batch.engine is not engine:
            self._batch = BatchDecoder(engine, slots=self.batch_size)
        f = job.frame
        t_start = time.monotonic()
        prepared = engine.prepare(f.gen)  # template + tokenize + context check
        prepare_ns = int((time.monotonic() - t_start) * 1e9)
        parts: list[str] = []
        job._tokens = 0

        def on_delta(delta: str) -> None:
            job._tokens += 1
            parts.append(delta)
            if f.stream:
                job.emit(protocol.delta_frame(job.id, delta, job._tokens), False)
            # Same contract as one-at-a-time: per delta of each job. Pacing measures the time
            # since its last call, so only the first job of a step sleeps.
            for hook in self.token_hooks:
                hook(job, job._tokens)

        def on_done(stats: dict) -> None:
            self._end_batched(job, self._final_frame(job, engine, "".join(parts), stats, prepare_ns, t_start))

        self._batch.add(prepared, cancel=job.cancel, on_delta=on_delta, on_done=on_done)

    def _end_batched(self, job: Job, frame: dict) -> None:
        job.finish(frame)
        self._forget(job)
        with self._cv:
            if job in self.active:
                self.active.remove(job)
            self.running = self.active[0] if self.active else None
            self._last_used = time.monotonic()
            if self.keep_alive == 0 and self.engine is not None and not self._heap and not self.active:
                self._unload()
            self._cv.notify_all()
