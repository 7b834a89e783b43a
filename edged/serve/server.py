"""The daemon: load model -> open transports -> ready; stop.

One `Config` flows in. Every transport hands the raw bytes of a request and a
`Peer` (its requester) to `Server.receive`, the one receive path: it applies
the size limit, decodes and validates, answers errors, answers the small ops
itself and queues generations on the scheduler. Frames flow back through the
peer. Transports never touch the scheduler.

Lifecycle callbacks (`on_ready`, `on_reloading`, `on_reloaded`, `on_stopping`:
lists of callables taking the server) and `governor` (any object with
`status() -> dict`) are how edged/ops attaches the governor and systemd.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable

from edged import __version__, protocol
from edged.engine.constrain import tool_calls
from edged.errors import ConfigError, EdgedError, ModelNotFound, ShuttingDown
from edged.protocol import Frame, Peer
from edged.ops.sources import rss_bytes
from edged.serve.config import Config, live_keys
from edged.serve.scheduler import Job, Scheduler

log = logging.getLogger("edged.server")


class Server:
    def __init__(self, config: Config, *, store=None, engine=None):
        self.config = config
        self.store = store  # a ModelStore; None = from config.models_dir / EDGED_HOME
        self.on_ready: list[Callable[[Server], Any]] = []
        self.on_reloading: list[Callable[[Server], Any]] = []
        self.on_reloaded: list[Callable[[Server], Any]] = []
        self.on_stopping: list[Callable[[Server], Any]] = []
        self.governor = None
        self.scheduler: Scheduler | None = None
        self.transports: list = []
        self.started = time.monotonic()
        self.model_info: dict = {}
        self.ready = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._engine = engine  # a preloaded engine (tests, benchmarks); the scheduler owns it once started
        self._stop: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------
    async def serve(self, *, install_signals: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self.request_stop)
            self.loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            await self.startup()
            await self._stop.wait()
        finally:
            await self.shutdown()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    self.loop.remove_signal_handler(sig)

    async def startup(self) -> None:
        from edged.transports import enabled_transports

        cfg = self.config
        self.loop = self.loop or asyncio.get_running_loop()
        self._stop = self._stop or asyncio.Event()
        engine = self._engine or await self.loop.run_in_executor(None, self._load_engine)
        self._engine = None
        self.model_info = engine.describe()
        log.info("model %s loaded (%s, %d threads)", engine.model.name, self.model_info["quantization"], self.model_info["threads"])
        self.scheduler = Scheduler(
            self._load_engine,
            queue_size=cfg.queue_size,
            keep_alive=cfg.keep_alive,
            retry_after_ms=cfg.retry_after_ms,
            engine=engine,
            batch_size=cfg.batch_size,
            limits=cfg.limits,  # the same object SIGHUP updates: changes apply at once
            prefix_cache=cfg.prefix_cache,  # likewise
            pinned=lambda: [r.system for r in self.config.routes if r.system],  # routes' system prompts
        )
        self.scheduler.start()
        self.transports = enabled_transports(self)
        for t in self.transports:
            await t.start()
        self.ready = True
        log.info("ready")
        self._fire(self.on_ready)

    def request_stop(self) -> None:
        """Thread- and signal-safe: begin a graceful stop."""
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)

    async def shutdown(self) -> None:
        if self.scheduler is None:
            return
        log.info("stopping: no new requests; %.0fs grace for in-flight work", self.config.shutdown_grace)
        self.ready = False
        self._fire(self.on_stopping)
        for t in self.transports:
            await t.stop_accepting()
        await self.loop.run_in_executor(None, self.scheduler.drain, self.config.shutdown_grace)
        for t in reversed(self.transports):
            await t.close()
        self.transports.clear()
        self.scheduler = None
        log.info("stopped")

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; apply the keys marked live, report the rest."""
        if self.config.source is None:
            log.info("SIGHUP: no config file to reload")
            return
        self._fire(self.on_reloading)
        try:
            new = Config.load(self.config.source)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e.message)
            self._fire(self.on_reloaded)  # still running: systemd waits for READY=1 after RELOADING=1
            return
        old_flat, new_flat = _flatten(self.config.to_dict()), _flatten(new.to_dict())
        changed = sorted(k for k in new_flat if new_flat[k] != old_flat.get(k))
        live = live_keys()
        applied = [k for k in changed if k in live]
        later = [k for k in changed if k not in live]
        for key in applied:
            section, _, leaf = key.rpartition(".")
            setattr(getattr(self.config, section) if section else self.config, leaf,
                    getattr(getattr(new, section) if section else new, leaf))
        cfg = self.config
        if self.scheduler is not None:
            self.scheduler.reconfigure(queue_size=cfg.queue_size, keep_alive=cfg.keep_alive, retry_after_ms=cfg.retry_after_ms)
        logging.getLogger("edged").setLevel(cfg.log_level.upper())
        log.info("reloaded: %s", f"applied {', '.join(applied)}" if applied else "nothing to change")
        if later:
            log.warning("reloaded: %s changed but need a restart to take effect", ", ".join(later))
        for t in self.transports:
            t.reconfigure()
        self._fire(self.on_reloaded)

    def _fire(self, callbacks) -> None:
        for cb in list(callbacks):
            try:
                cb(self)
            except Exception:
                log.exception("lifecycle callback %r failed", cb)

    def _load_engine(self):
        from edged.models.loading import load_engine
        from edged.models.store import ModelStore

        store = self.store
        if store is None:
            store = ModelStore(Path(self.config.models_dir)) if self.config.models_dir else ModelStore()
        return load_engine(self.config.model, config=self.config.engine, store=store)

    # -- requests (called by transports, from any thread) -----------------------
    def receive(self, data: bytes, peer: Peer) -> None:
        """The one receive path. Always leads to exactly one final frame through
        `peer.send` (for generations possibly after deltas), unless the peer's
        `admit` says the transport answered already."""
        obj = None
        try:
            obj = protocol.decode(data, limit=self.config.max_request_bytes)
            peer.route(obj)
            frame = protocol.parse(obj, default_stream=peer.default_stream, default_op=peer.default_op,
                                   max_prompt_chars=self.config.max_prompt_chars)
        except EdgedError as e:
            peer.send(protocol.error_frame(protocol.peek_id(obj), e), True)
            return
        if not peer.admit(frame):
            return
        try:
            self._dispatch(frame, peer)
        except EdgedError as e:
            peer.send(protocol.error_frame(frame.id, e), True)

    def cancel_all(self, scope: str) -> int:
        """Cancel what a requester that went away had queued or running."""
        return self.scheduler.cancel_scope(scope) if self.scheduler is not None else 0

    def _dispatch(self, frame: Frame, peer: Peer) -> None:
        if frame.op in protocol.GEN_OPS:
            self._submit(frame, peer)
        elif frame.op == "cancel":
            ok = self.scheduler.cancel(peer.scope, frame.target) if self.scheduler else False
            peer.send(protocol.reply_frame(frame.id, {"target": frame.target, "cancelled": ok}), True)
        elif frame.op == "status":
            peer.send(protocol.reply_frame(frame.id, {"status": self.status()}), True)
        elif frame.op == "health":
            peer.send(protocol.reply_frame(frame.id, {"health": "ok" if self.ready else "starting"}), True)
        elif frame.op == "models":
            peer.send(protocol.reply_frame(frame.id, {"models": self.models()}), True)

    def _submit(self, frame: Frame, peer: Peer) -> None:
        sched = self.scheduler
        if sched is None:
            raise ShuttingDown("the daemon is shutting down")
        name = self.model_info.get("name")
        if frame.model is not None and frame.model != name and frame.model.split(":")[0] != name:
            raise ModelNotFound(f"model {frame.model!r} is not loaded; this daemon serves {name!r}", field="model")
        deadlines = [d for d in (peer.deadline,) if d is not None]
        if frame.timeout_ms is not None:
            deadlines.append(time.monotonic() + frame.timeout_ms / 1000)
        elif not deadlines and self.config.default_timeout:
            deadlines.append(time.monotonic() + self.config.default_timeout)
        job = Job(request=frame.gen, sink=Replies(self, peer, frame), scope=peer.scope, owner=peer.identity or peer.scope, rid=frame.id,
                  priority=frame.priority, deadline=min(deadlines) if deadlines else None)
        sched.submit(job)

    # -- status ----------------------------------------------------------------
    def status(self) -> dict:
        s = self.scheduler
        info = self.model_info
        gov = self.governor.status() if self.governor is not None else None
        return {
            "version": __version__,
            "model": info.get("name"),
            "quantization": info.get("quantization"),
            "context_length": info.get("context_length"),
            "threads": info.get("threads"),
            "loaded": bool(s and s.engine is not None),
            "keep_alive": self.config.keep_alive,
            "queue_depth": s.depth if s else 0,
            "queue_size": self.config.queue_size,
            "in_flight": s.running if s else 0,
            "tokens_per_second": s.tokens_per_second() if s else None,
            "requests_completed": s.completed if s else 0,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "rss_bytes": rss_bytes(),
            "prefix_cache": s.prefix_cache_status() if s else None,  # bytes held for prompt reuse, budget
            "transports": {t.name: t.describe() for t in self.transports},
            "governor": gov,
        }

    def models(self) -> list[dict]:
        info = dict(self.model_info)
        info["loaded"] = bool(self.scheduler and self.scheduler.engine is not None)
        return [info]


class Replies:
    """A job's sink: turns the scheduler's deltas and end into frames for the peer.
    A peer that fails to take a frame never reaches into the batch."""

    def __init__(self, server: Server, peer: Peer, frame: Frame):
        self.server = server
        self.peer = peer
        self.frame = frame

    def _send(self, out: dict, final: bool) -> None:
        try:
            self.peer.send(out, final)
        except Exception:
            log.exception("sending a reply to %s failed", self.peer.scope)

    def delta(self, job: Job, text: str) -> None:
        if self.frame.stream:
            self._send(protocol.delta_frame(self.frame.id, text, job.tokens), False)

    def done(self, job: Job, text: str, stats: dict) -> None:
        model = self.server.model_info.get("name") or ""
        calls = tool_calls(self.frame.gen, text, stats.get("done_reason")) if self.frame.gen is not None else None
        self._send(
            protocol.final_frame(self.frame.id, model=model, text=text, stats=stats, chat=self.frame.op == "chat", tool_calls=calls),
            True,
        )

    def failed(self, job: Job, error: Exception) -> None:
        self._send(protocol.error_frame(self.frame.id, error), True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(config: Config, **kwargs) -> int:
    """Blocking entry point for `edged serve`."""
    from edged.ops.wiring import attach

    server = Server(config, **kwargs)
    attach(server)  # governor + sd_notify/watchdog/journald (no-ops outside systemd)
    asyncio.run(server.serve())
    return 0
