"""One inference worker per loaded model, fed by a bounded priority queue.

Generation is CPU-bound and the board has 2-4 cores, so one worker thread runs
the model. It keeps up to `batch_size` requests decoding together (continuous
batching, engine/batch.py): decoding is memory-bound, so one step that advances
every active request costs little more than a step for one. A single stream is
a batch of one. Between steps, queued requests are prefilled into free slots.

The scheduler knows nothing of wire frames: a job reports its text deltas and
its end through the `Sink` the server gave it (called on the worker thread).

Hooks, for the governor and systemd (edged/ops/wiring.py):
- `admission_hooks`: `(job) -> None | EdgedError`, run at submit; return e.g.
  `Busy(..., retry_after_ms=...)` to refuse work;
- `token_hooks`: `(job, n_tokens)`, run after each token of each job on the
  worker thread; they may sleep to pace generation;
- `load_hooks`: `()`, run before a model (re)load, may raise to refuse it;
- `engine_hooks`: `(engine)`, run when an engine is installed (start or reload).
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
from typing import Any, Callable, Protocol

from edged.engine.batch import BatchDecoder
from edged.engine.request import GenerateRequest
from edged.errors import Busy, Cancelled, DeadlineExceeded, DuplicateRequest, EdgedError, ShuttingDown

log = logging.getLogger("edged.scheduler")


class Sink(Protocol):
    def delta(self, job: "Job", text: str) -> None: ...

    def done(self, job: "Job", text: str, stats: dict) -> None: ...

    def failed(self, job: "Job", error: Exception) -> None: ...


@dataclass(eq=False, kw_only=True)
class Job:
    request: GenerateRequest
    sink: Sink
    scope: str = ""  # the requester: ids and cancels are per scope
    owner: str = ""  # who is charged for it (quotas): a device identity, else the scope
    rid: Any = None  # the requester's id, None when it gave none
    priority: int = 0
    deadline: float | None = None  # time.monotonic() after which it is cut off
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    state: str = "new"  # new | queued | running | done
    seq: int = 0
    tokens: int = 0  # deltas emitted so far
    text: list[str] = field(default_factory=list)
    error: Exception | None = None  # set when its own callbacks failed: it ends alone, with this

    @property
    def key(self) -> tuple[str, str] | None:
        return None if self.rid is None else (self.scope, str(self.rid))

    def finish(self, text: str | None = None, stats: dict | None = None, error: Exception | None = None) -> None:
        # Exactly one end per job, whoever gets there first.
        if self.state == "done":
            return
        self.state = "done"
        try:
            if error is not None:
                self.sink.failed(self, error)
            else:
                self.sink.done(self, text or "", stats or {})
        except Exception:  # a requester that went away must not stop the worker
            log.exception("reporting the end of request %r failed", self.rid)


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
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.keep_alive = keep_alive
        self.retry_after_ms = retry_after_ms
        self.admission_hooks: list[Callable[[Job], EdgedError | None]] = []
        self.token_hooks: list[Callable[[Job, int], None]] = []
        self.load_hooks: list[Callable[[], None]] = []
        self.engine_hooks: list[Callable[[Any], None]] = []
        self.engine = engine
        self.model_name: str | None = engine.model.name if engine is not None else None
        self.active: list[Job] = []  # running jobs, oldest first
        self.recent: collections.deque = collections.deque(maxlen=16)  # (eval_count, eval_ns, total_ns)
        self.completed = 0
        self._batch: BatchDecoder | None = None
        self._heap: list[tuple[int, int, Job]] = []
        self._jobs: dict[tuple[str, str], Job] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._stopping = False
        self._last_used = time.monotonic()
        self.progressed = time.monotonic()  # last job start or decode step (the watchdog reads it)
        self._thread = threading.Thread(target=self._run, name="edged-worker", daemon=True)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self.engine is not None:
            self._installed(self.engine)
        self._thread.start()

    def reconfigure(self, *, queue_size: int, keep_alive: float, retry_after_ms: int) -> None:
        with self._cv:
            self.queue_size = queue_size
            self.keep_alive = keep_alive
            self.retry_after_ms = retry_after_ms
            self._cv.notify_all()  # a new keep_alive re-arms the idle timer

    def drain(self, grace: float) -> None:
        """Let queued and running work finish for up to `grace` seconds, then cancel
        the rest; every waiting requester gets its end. Blocks."""
        end = time.monotonic() + grace
        with self._cv:
            self._closed = True
            while (self._heap or self.active) and time.monotonic() < end:
                self._cv.wait(timeout=max(0.0, min(0.5, end - time.monotonic())))
            leftovers = [j for _, _, j in self._heap]
            self._heap.clear()
            self._stopping = True
            for job in self.active:
                job.cancel.set()
            self._cv.notify_all()
        for job in leftovers:
            self._forget(job)
            job.finish(error=ShuttingDown("the daemon is shutting down"))
        self._thread.join(timeout=max(5.0, grace))

    # -- submission ------------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue a job; returns its queue position (1 = next). Raises Busy,
        ShuttingDown, DuplicateRequest or DeadlineExceeded without queueing."""
        for hook in self.admission_hooks:
            err = hook(job)
            if err is not None:
                raise err
        with self._cv:
            if self._closed:
                raise ShuttingDown("the daemon is shutting down")
            if job.deadline is not None and time.monotonic() >= job.deadline:
                raise DeadlineExceeded("the request expired before it was queued")
            key = job.key
            if key is not None and key in self._jobs:
                raise DuplicateRequest(f"request id {job.rid!r} is already queued or running", field="id")
            if len(self._heap) >= self.queue_size:
                raise Busy(
                    f"queue full ({len(self._heap)} waiting); retry later",
                    retry_after_ms=self._retry_after(len(self._heap) + 1),
                    queue_position=len(self._heap) + 1 + len(self.active),
                )
            job.seq = next(self._seq)
            job.state = "queued"
            heapq.heappush(self._heap, (-job.priority, job.seq, job))
            if key is not None:
                self._jobs[key] = job
            self._cv.notify_all()
            return 1 + sum(1 for p, s, _ in self._heap if (p, s) < (-job.priority, job.seq))

    def cancel(self, scope: str, rid: Any) -> bool:
        """Cancel the requester's own request `rid`; False when it has none by that id."""
        with self._cv:
            job = self._jobs.get((scope, str(rid)))
            if job is None:
                return False
            if job.state != "queued":
                job.cancel.set()  # the worker stops it before its next token
                return True
            self._heap = [e for e in self._heap if e[2] is not job]
            heapq.heapify(self._heap)
            del self._jobs[job.key]
            self._cv.notify_all()
        job.finish(error=Cancelled("cancelled before it started"))
        return True

    def cancel_scope(self, scope: str) -> int:
        """Cancel everything a requester submitted (it went away)."""
        with self._cv:
            ids = [j.rid for (s, _), j in self._jobs.items() if s == scope]
        return sum(self.cancel(scope, rid) for rid in ids)

    def unload_if_idle(self) -> bool:
        """Unload the model now if nothing is queued or running; True when it did."""
        with self._cv:
            if self.engine is None or self.active or self._heap:
                return False
            self._unload()
            return True

    # -- introspection ---------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._heap)

    @property
    def running(self) -> int:
        return len(self.active)

    @property
    def worker_alive(self) -> bool:
        return self._thread.ident is None or self._thread.is_alive()

    def tokens_per_second(self) -> float | None:
        n = sum(r[0] for r in self.recent)
        ns = sum(r[1] for r in self.recent)
        return round(n / (ns / 1e9), 2) if ns else None

    def _retry_after(self, ahead: int) -> int:
        if self.recent:
            avg_ms = sum(r[2] for r in self.recent) / len(self.recent) / 1e6
            return max(1, int(avg_ms * ahead / max(1, self.batch_size)))
        return self.retry_after_ms

    def _forget(self, job: Job) -> None:
        with self._cv:
            if job.key is not None and self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    # -- the worker --------------------------------------------------------------
    def _run(self) -> None:
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
            for job in admit:
                try:
                    self._start(job)
                except Exception as e:
                    self._fail(job, e)
            if self._batch is not None and self._batch.active:
                self._step()

    def _idle_wait(self) -> None:
        """Wait for work (self._cv held); unload the model once it has been idle for keep_alive."""
        timeout = None
        if self.engine is not None and self.keep_alive >= 0:
            timeout = max(0.0, self._last_used + self.keep_alive - time.monotonic())
            if timeout == 0.0:
                log.info("model %s idle for %.0fs: unloaded (reloads on the next request)", self.model_name, self.keep_alive)
                self._unload()
                return
        self._cv.wait(timeout=timeout)

    def _unload(self) -> None:
        self.engine = None
        self._batch = None  # its buffers and bindings hold the session too
        gc.collect()

    def _installed(self, engine) -> None:
        self.model_name = engine.model.name
        for hook in self.engine_hooks:
            hook(engine)

    def _engine_for(self, job: Job):
        """Last checks before a job runs, and the engine it runs on (reloaded after an idle unload)."""
        if job.cancel.is_set():
            raise Cancelled("cancelled before it started")
        if job.deadline is not None and time.monotonic() >= job.deadline:
            raise DeadlineExceeded("the request expired while it waited in the queue; it was not run")
        if self.engine is None:
            log.info("loading model %s", self.model_name or "")
            for hook in self.load_hooks:
                hook()
            engine = self.loader()
            self._installed(engine)
            self.engine = engine
        return self.engine

    def _start(self, job: Job) -> None:
        engine = self._engine_for(job)
        if self._batch is None or not self._batch.serves(engine):
            self._batch = BatchDecoder(engine, slots=self.batch_size)
        t_start = time.monotonic()
        job.started = self.progressed = t_start
        prepared = engine.prepare(job.request)  # template + tokenize + context check
        prepare_ns = int((time.monotonic() - t_start) * 1e9)

        def on_delta(delta: str) -> None:
            job.tokens += 1
            job.text.append(delta)
            try:
                job.sink.delta(job, delta)
                for hook in self.token_hooks:
                    hook(job, job.tokens)
            except Exception as e:  # this request stops at its next token; the others go on
                log.exception("request %r: token callback failed", job.rid)
                job.error = job.error or e
                job.cancel.set()

        def on_done(stats: dict) -> None:
            if job.error is not None:
                self._end(job, error=job.error)
                return
            # Like Ollama, total_duration covers templating and tokenization; queue_duration is ours.
            s = dict(stats)
            s["total_duration"] += prepare_ns
            s["queue_duration"] = int((t_start - job.enqueued) * 1e9)
            self.recent.append((s["eval_count"], s["eval_duration"], s["total_duration"]))
            self.completed += 1
            self._end(job, text="".join(job.text), stats=s)

        self._batch.add(prepared, cancel=job.cancel, on_delta=on_delta, on_done=on_done)

    def _step(self) -> None:
        try:
            self._batch.step()
            self.progressed = time.monotonic()
        except Exception as e:  # the session failed: every request in the batch gets an error
            log.exception("batched step failed")
            for job in list(self.active):
                self._end(job, error=e)
            self._batch = None

    def _fail(self, job: Job, e: Exception) -> None:
        if not isinstance(e, EdgedError):
            log.exception("request %r failed", job.rid, extra={"REQUEST_ID": str(job.rid)})
        self._end(job, error=e)

    def _end(self, job: Job, *, text: str = "", stats: dict | None = None, error: Exception | None = None) -> None:
        job.finish(text, stats, error)
        self._forget(job)
        with self._cv:
            if job in self.active:
                self.active.remove(job)
            self._last_used = time.monotonic()
            if self.keep_alive == 0 and self.engine is not None and not self._heap and not self.active:
                self._unload()
            self._cv.notify_all()
