"""One inference worker per loaded model, fed by a bounded priority queue.

Generation is CPU-bound and the board has 2-4 cores, so one worker thread runs
the model. It keeps up to `batch_size` requests decoding together (continuous
batching, engine/batch.py): decoding is memory-bound, so one step that advances
every active request costs little more than a step for one. A single stream is
a batch of one. Between steps, queued requests are prefilled into free slots.

Fairness (`limits`, a LimitsConfig, read on every use so SIGHUP changes apply
at once). A requester is `job.owner`:
- it may have `max_queued_per_requester` requests queued or running; more get
  `busy` with a retry hint;
- with `tokens_per_minute`, a request is admitted only when the tokens it may
  make (its num_predict after the caps) fit in what the requester generated
  over the last minute plus what its queued and running requests may still
  make; otherwise `busy`, with `retry_after_ms` from when enough of the minute
  expires. A request holds its full allowance until it ends, then only what it
  generated counts;
- priorities above `max_priority` are lowered to it; num_predict above
  `max_num_predict` (and -1) is lowered to it when the request is prepared;
- among queued requests of equal priority, the one whose requester has the
  fewest running goes first, then the one whose requester was served least
  recently, then arrival order: requesters take turns, so one with several
  queued cannot keep another's single request waiting behind all of them;
- a running request past its deadline stops at its next token and ends with
  its partial text and done_reason "deadline".

The scheduler knows nothing of wire frames: a job reports its text deltas and
its end through the `Sink` the server gave it (called on the worker thread).

Hooks, for the governor and systemd (edged/ops/wiring.py):
- `admission_hooks`: `(job) -> None | EdgedError`, run at submit; return e.g.
  `Busy(..., retry_after_ms=...)` to refuse work;
- `token_hooks`: `(job, n_tokens)`, run after each token of each job on the
  worker thread; they may sleep to pace generation;
- `load_hooks`: `()`, run before a model (re)load, may raise to refuse it;
- `engine_hooks`: `(engine)`, run when an engine is installed (start or reload).

Prefix cache (engine/prefix.py): the batch keeps the prompts of finished requests
in free slots, and the system prompts of `prefix_cache.system_prompts` and of
`pinned()` (the daemon passes its routes') are pinned; `prefix_cache.size_mb` is
read on every use. `trim_prefix_cache(keep)` (the governor, under memory pressure)
scales that budget; the worker applies it between steps.
"""

from __future__ import annotations

import collections
import gc
import heapq
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from edged.engine.batch import BatchDecoder
from edged.engine.prefix import PrefixCache, system_prefix
from edged.engine.request import GenerateRequest
from edged.errors import Busy, Cancelled, DeadlineExceeded, DuplicateRequest, EdgedError, ShuttingDown
from edged.serve.config import LimitsConfig, PrefixCacheConfig

log = logging.getLogger("edged.scheduler")

WINDOW = 60.0  # seconds: tokens_per_minute counts over a rolling minute


class _Budget:
    """One requester's tokens: what its requests generated in the last WINDOW seconds
    (counted when each ended), and what its queued and running ones may still make."""

    __slots__ = ("spent", "held")

    def __init__(self):
        self.spent: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic end time, tokens)
        self.held = 0

    def used(self, now: float) -> int:
        while self.spent and self.spent[0][0] <= now - WINDOW:
            self.spent.popleft()
        return self.held + sum(n for _, n in self.spent)


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
    held: int = 0  # tokens held against its owner's per-minute budget until it ends

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
        limits: LimitsConfig | None = None,
        prefix_cache: PrefixCacheConfig | None = None,
        pinned: Callable[[], Iterable[str]] | None = None,
    ):
        self.loader = loader  # () -> Engine; called again after an idle unload
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.keep_alive = keep_alive
        self.retry_after_ms = retry_after_ms
        # Shared with the daemon's Config, which SIGHUP updates in place.
        self.limits = limits if limits is not None else LimitsConfig()
        self._budgets: dict[str, _Budget] = {}
        # Shared with the daemon's Config too; pinned() adds system prompts (the routes').
        self.prefix_config = prefix_cache if prefix_cache is not None else PrefixCacheConfig()
        self._prefix = PrefixCache(size_mb=lambda: self.prefix_config.size_mb)
        self._pinned = pinned
        self._pins_key: tuple | None = None
        self._trim_pending = False
        self._swept = time.monotonic()
        self._last_start: dict[str, int] = {}  # owner -> when it last had a job started (a counter)
        self._starts = itertools.count()
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
            for job in leftovers:
                self._settle(job, 0)
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
        ShuttingDown, DuplicateRequest or DeadlineExceeded without queueing.
        A priority above limits.max_priority is lowered to it."""
        job.priority = min(job.priority, self.limits.max_priority)
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
            hold = self._owner_admits(job)
            if len(self._heap) >= self.queue_size:
                raise Busy(
                    f"queue full ({len(self._heap)} waiting); retry later",
                    retry_after_ms=self._retry_after(len(self._heap) + 1),
                    queue_position=len(self._heap) + 1 + len(self.active),
                )
            job.seq = next(self._seq)
            job.state = "queued"
            heapq.heappush(self._heap, (-job.priority, job.seq, job))
            if hold:
                job.held = hold
                self._budgets.setdefault(job.owner, _Budget()).held += hold
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
            self._settle(job, 0)
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

    def trim_prefix_cache(self, keep: float = 0.0) -> None:
        """Hold at most `keep` (0..1) of prefix_cache.size_mb from now on: 0 drops every
        kept prompt and pinned copy, 1 restores the configured budget. Thread-safe: the
        worker applies it between steps (at once when idle)."""
        with self._cv:
            self._prefix.keep = max(0.0, min(1.0, float(keep)))
            self._trim_pending = True
            self._cv.notify_all()

    def prefix_cache_status(self) -> dict:
        """Budget and use of the prefix cache (bytes), for status reports."""
        batch = self._batch
        kept = batch.kept_bytes if batch is not None else 0
        return {**self._prefix.describe(), "kept_bytes": kept, "keep": self._prefix.keep}

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

    # -- per-requester limits (self._cv held) --------------------------------------
    def predict_cap(self) -> int:
        """The most tokens one request may generate: max_num_predict, and no more
        than a whole minute's budget when tokens_per_minute is set."""
        lim = self.limits
        return min(lim.max_num_predict, lim.tokens_per_minute) if lim.tokens_per_minute else lim.max_num_predict

    def _owner_admits(self, job: Job) -> int:
        """Raise Busy when the job's owner is at its request or token limit; else return
        the tokens the job holds against the owner's budget (0 when there is none)."""
        lim = self.limits
        mine = [j for j in self.active if j.owner == job.owner] + [e[2] for e in self._heap if e[2].owner == job.owner]
        cap = lim.max_queued_per_requester
        if cap and len(mine) >= cap:
            raise Busy(
                f"{len(mine)} requests from this requester are queued or running (at most {cap}); retry later",
                retry_after_ms=self._retry_after(self._ahead_of_first(mine)),
            )
        tpm = lim.tokens_per_minute
        if not tpm:
            return 0
        now = time.monotonic()
        if now - self._swept > WINDOW:
            self._swept = now
            for owner, b in list(self._budgets.items()):
                if not b.used(now):
                    del self._budgets[owner]
        cost = self._token_cost(job)
        b = self._budgets.get(job.owner)
        over = (b.used(now) if b else 0) + cost - tpm
        if over > 0:
            raise Busy(
                f"this requester's token budget is spent ({tpm} tokens a minute; this request may make {cost}); retry later",
                retry_after_ms=self._budget_retry(b, over, now, mine),
            )
        return cost

    def _token_cost(self, job: Job) -> int:
        """The most tokens the job may generate, from its options before it is prepared."""
        n = job.request.options.get("num_predict") if job.request is not None else None
        if n is None and self.engine is not None:
            n = self.engine.defaults.num_predict
        cap = self.predict_cap()
        return cap if n is None or n < 0 else min(n, cap)

    def _budget_retry(self, b: _Budget | None, over: int, now: float, mine: list[Job]) -> int:
        """Milliseconds until `over` tokens of the owner's minute have expired: the
        earliest a retry of the same request could fit."""
        freed = 0
        for t, n in b.spent if b else ():
            freed += n
            if freed >= over:
                return max(1, math.ceil((t + WINDOW - now) * 1000))
        # The rest is held by its own queued and running requests: they give back what
        # they did not use when they end, and what they used expires a minute later.
        last = math.ceil((b.spent[-1][0] + WINDOW - now) * 1000) if b and b.spent else 1
        return max(1, last, self._retry_after(self._ahead_of_first(mine)) if mine else 1)

    def _ahead_of_first(self, mine: list[Job]) -> int:
        """Requests to finish before the first of `mine` does (itself included)."""
        if any(j.state == "running" for j in mine):
            return 1
        keys = sorted((p, s) for p, s, _ in self._heap)
        first = min(((-j.priority, j.seq) for j in mine), default=None)
        return len(self.active) + (keys.index(first) + 1 if first in keys else 1)

    def _settle(self, job: Job, generated: int) -> None:
        """The job ended: give back what it held; count what it generated for a minute."""
        if not job.held and not generated:
            return
        b = self._budgets.get(job.owner)
        if b is None:
            if not self.limits.tokens_per_minute:
                return
            b = self._budgets[job.owner] = _Budget()
        b.held = max(0, b.held - job.held)
        job.held = 0
        if generated and self.limits.tokens_per_minute:
            b.spent.append((time.monotonic(), generated))
        if not b.held and not b.spent:
            del self._budgets[job.owner]

    def _forget(self, job: Job) -> None:
        with self._cv:
            if job.key is not None and self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    # -- the worker --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self.active and not self._stopping and not self._trim_pending:
                    self._idle_wait()
                if self._stopping and not self.active:
                    return
                trim, self._trim_pending = self._trim_pending, False
                admit = []
                running = collections.Counter(j.owner for j in self.active)
                while self._heap and not self._stopping and len(self.active) + len(admit) < self.batch_size:
                    job = self._pop_next(running)
                    running[job.owner] += 1
                    job.state = "running"
                    admit.append(job)
                self.active.extend(admit)
            if trim:
                self._fit_prefix_cache()
            for job in admit:
                try:
                    self._start(job)
                except Exception as e:
                    self._fail(job, e)
            if self._batch is not None and self._batch.active:
                self._step()

    def _pop_next(self, running: collections.Counter) -> Job:
        """The next job (self._cv held): highest priority; among equals, the one whose
        owner has the fewest running, then whose owner started one least recently
        (never, for an owner with nothing queued or running), then the oldest."""
        heap, last = self._heap, self._last_start
        i = min(range(len(heap)), key=lambda k: (heap[k][0], running[heap[k][2].owner], last.get(heap[k][2].owner, -1), heap[k][1]))
        job = heap[i][2]
        heap[i] = heap[-1]
        heap.pop()
        heapq.heapify(heap)
        present = {e[2].owner for e in heap} | set(running) | {job.owner}
        self._last_start = {o: n for o, n in last.items() if o in present}
        self._last_start[job.owner] = next(self._starts)
        return job

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
        self._prefix.clear()  # pinned copies belong to the session
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
            # a new session (a reload, a throttle rebuild) invalidates every cached prefix
            self._batch = BatchDecoder(engine, slots=self.batch_size, prefix=self._prefix)
        self._update_pins(engine)
        self._batch.fit_prefix_cache()  # size_mb may have changed (SIGHUP)
        t_start = time.monotonic()
        job.started = self.progressed = t_start
        prepared = engine.prepare(job.request, max_predict=self.predict_cap())  # template + tokenize + context check
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

        self._batch.add(prepared, cancel=job.cancel, deadline=job.deadline, on_delta=on_delta, on_done=on_done)

    def _update_pins(self, engine) -> None:
        """Pin the configured and the routes' system prompts (tokenized when they change)."""
        systems = [*self.prefix_config.system_prompts, *(self._pinned() if self._pinned is not None else ())]
        key = (id(engine), tuple(dict.fromkeys(s for s in systems if s)))
        if key == self._pins_key:
            return
        self._pins_key = key
        pins = []
        for text in key[1]:
            try:
                pins.append(system_prefix(engine, text))
            except Exception:  # a prompt the template cannot render is not pinned
                log.exception("cannot pin a system prompt in the prefix cache")
        self._prefix.set_pins(pins)

    def _fit_prefix_cache(self) -> None:
        if self._batch is not None:
            self._batch.fit_prefix_cache()
        else:
            self._prefix.fit()

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
        # The id and the requester's quota are released before the final frame goes out: a
        # requester may reuse the id (or send its next request) the moment it has its answer.
        self._forget(job)
        with self._cv:
            self._settle(job, stats["eval_count"] if stats and "eval_count" in stats else job.tokens)
            if job in self.active:
                self.active.remove(job)
            self._last_used = time.monotonic()
            if self.keep_alive == 0 and self.engine is not None and not self._heap and not self.active:
                self._unload()
            self._cv.notify_all()
        job.finish(text, stats, error)
