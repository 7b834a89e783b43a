"""Attach the governor and the systemd notifier to a Server in one call.

    from edged.ops.wiring import attach
    attach(server)          # before server.serve()

Uses only public parts of the server: its lifecycle callback lists,
`server.governor` (status provider), and the scheduler's hooks (admission,
token, before a model load, when an engine is installed), `unload_if_idle()` and
`trim_prefix_cache()`.
"""

from __future__ import annotations

import json
import logging
import os
import time

from edged.ops.governor import Change, Governor, GovernorConfig
from edged.ops.systemd import Notifier, Progress
from edged.ops.throttle import throttle_engine

log = logging.getLogger("edged.ops")


class Ops:
    def __init__(self, server, governor: Governor | None, notifier: Notifier, progress: Progress):
        self.server = server
        self.governor = governor
        self.notifier = notifier
        self.progress = progress
        self.runner = None

    # -- text for systemd's STATUS= ------------------------------------------------
    def status_text(self) -> str:
        s = self.server
        model = s.model_info.get("name") or s.config.model
        loaded = bool(s.scheduler and s.scheduler.engine is not None)
        head = f"{model} {'loaded' if loaded else 'unloaded'}"
        if s.scheduler is not None:
            head += f", queue {s.scheduler.depth}"
        if self.governor is not None:
            return f"{head}; {self.governor.status_line()}"
        return head

    # -- engine -------------------------------------------------------------------
    def engine_installed(self, engine) -> None:
        """Each engine the scheduler installs (at start and after an idle unload) gets the
        throttled runner; the governor samples at once, since the load just took the model's
        size out of the headroom and the next admission must not judge against a stale figure."""
        gov = self.governor
        if gov is None:
            return
        self.runner = throttle_engine(engine)
        self.runner.set_threads(gov.threads)
        gov.kv_bytes_per_token = engine.info.kv_bytes(1)
        gov.update()

    def before_load(self) -> None:
        size = self.server.model_info.get("size")
        if self.governor is not None and size:
            self.governor.update()
            self.governor.check_load(int(size))  # InsufficientMemory -> error frame, no OOM

    # -- scheduler hooks ------------------------------------------------------------
    def admission(self, job):
        gov, gen = self.governor, job.request
        if gov is None or gen is None:
            return None
        gov.limit_options(gen.options)
        chars = len(gen.prompt or "") + sum(len(m.get("content") or "") for m in (gen.messages or ()))
        chars += len(gen.system or "")
        n_pred = gen.options.get("num_predict")
        ctx = self.server.model_info.get("context_length") or 2048
        if n_pred is None or n_pred < 0:
            n_pred = min(gen.options.get("num_ctx") or ctx, ctx)
        n_pred = min(n_pred, self.server.config.limits.max_num_predict)  # the scheduler caps it so
        tokens = min(chars // 3 + 16 + n_pred, gen.options.get("num_ctx") or ctx, ctx)
        sched, size = self.server.scheduler, self.server.model_info.get("size") or 0
        load = int(size * gov.config.load_factor) if sched is not None and sched.engine is None else 0
        return gov.admit(tokens=tokens, load_bytes=load)

    def token(self, job, n: int) -> None:
        self.progress.beat(job, n)
        if self.governor is not None:
            self.governor.pace(restart=n == 1)

    # -- lifecycle --------------------------------------------------------------------
    def on_ready(self, server) -> None:
        sched = server.scheduler
        if self.admission not in sched.admission_hooks:
            sched.admission_hooks.append(self.admission)
            sched.token_hooks.append(self.token)
            sched.load_hooks.append(self.before_load)
            sched.engine_hooks.append(self.engine_installed)
        if sched.engine is not None:
            self.engine_installed(sched.engine)
        if self.governor is not None:
            self.governor.start()
        self.notifier.ready(self.status_text())
        self.notifier.start_watchdog()

    def on_reloading(self, server) -> None:
        self.notifier.reloading()

    def on_reloaded(self, server) -> None:
        if self.governor is not None:
            self.governor.update()  # thresholds may have changed (governor.* are live keys)
        self.notifier.ready(self.status_text())

    def on_stopping(self, server) -> None:
        self.notifier.stopping()
        if self.governor is not None:
            self.governor.stop()

    def on_change(self, change: Change) -> None:
        gov = self.governor
        if change.kind == "thermal" and self.runner is not None:
            self.runner.set_threads(gov.threads)
        if change.kind == "memory":
            self._trim_prefix_cache(change.new)
        if change.kind == "memory" and gov.should_unload():
            self._unload_if_idle()
        self.notifier.status(self.status_text())
        self._publish(change)

    # Share of prefix_cache.size_mb kept per memory state: reused prompts are only a
    # speed-up, so they are the first memory given back.
    PREFIX_KEEP = {"ok": 1.0, "tight": 0.5, "critical": 0.0}

    def _trim_prefix_cache(self, state: str) -> None:
        sched = self.server.scheduler
        if sched is not None:
            keep = self.PREFIX_KEEP.get(state, 1.0)
            sched.trim_prefix_cache(keep)
            if keep < 1.0:
                log.info("memory %s: prefix cache limited to %.0f%% of its budget", state, keep * 100)

    def _unload_if_idle(self) -> None:
        sched = self.server.scheduler
        if sched is not None and sched.unload_if_idle():
            log.warning("memory critical: unloaded the idle model (%s)", self.governor.memory_cause)

    def _publish(self, change: Change) -> None:
        gov = self.governor.status()
        telemetry = {"governor": gov, "change": change.__dict__}
        info = {"governor": {"level": gov["level"], "memory": gov["memory"], "cause": gov["cause"]}}
        for t in list(self.server.transports):
            if not hasattr(t, "announce"):
                continue
            try:
                t.announce(telemetry, info)
            except Exception:
                log.debug("%s: could not announce the governor change", t.name, exc_info=True)


def attach(server, *, governor: Governor | None = None, notifier: Notifier | None = None,
           stall_s: float | None = None) -> Ops:
    cfg = getattr(server.config, "governor", None)
    if governor is None and isinstance(cfg, GovernorConfig) and cfg.enabled:
        governor = Governor(cfg)
    if stall_s is None:
        stall_s = float(os.environ.get("EDGED_WATCHDOG_STALL_S", "60"))
    progress = Progress(lambda: server.scheduler, stall_s=stall_s)
    notifier = notifier or Notifier(health=progress.healthy)
    ops = Ops(server, governor, notifier, progress)
    if governor is not None:
        server.governor = governor
        governor.listeners.append(ops.on_change)
    server.on_ready.append(ops.on_ready)
    server.on_reloading.append(ops.on_reloading)
    server.on_reloaded.append(ops.on_reloaded)
    server.on_stopping.append(ops.on_stopping)
    _use_journal(server)
    return ops


class _JournalFields(logging.Filter):
    """The MODEL journal field on every record (the scheduler adds REQUEST_ID to its own)."""

    def __init__(self, server):
        super().__init__()
        self.server = server

    def filter(self, record) -> bool:
        s = self.server
        record.MODEL = s.model_info.get("name") or s.config.model
        return True


def _use_journal(server) -> None:
    """Log to journald with fields when stderr is the journal and systemd-python is installed."""
    from edged.ops.systemd import journal_handler

    h = journal_handler()
    if h is None:
        return
    h.addFilter(_JournalFields(server))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, logging.StreamHandler) and getattr(old, "stream", None) is not None:
            root.removeHandler(old)  # the same lines would reach the journal twice
    root.addHandler(h)
