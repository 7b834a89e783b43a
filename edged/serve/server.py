"""The daemon: load model -> open transports -> ready; stop.

One `Config` flows in; transports hand validated frames to `Server.handle`,
which answers the small ops itself and queues generations on the scheduler;
frames flow back through the `emit` callable the transport passed in.

Seams for the edge-operations work (governor, sd_notify):
- lifecycle callbacks: `on_ready`, `on_reloading`, `on_reloaded`, `on_stopping`
  (lists of callables taking the server);
- `status()` is the status dict provider; `governor` (None for now) is any
  object with a `status() -> dict` method, reported as `status()["governor"]`;
- `scheduler.admission_hooks` / `scheduler.token_hooks` (see scheduler.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable

from edged import __version__
from edged.errors import ConfigError, EdgedError, ModelNotFound, ShuttingDown
from edged.serve import protocol
from edged.serve.config import LIVE_KEYS, Config
from edged.serve.protocol import Frame
from edged.serve.scheduler import Emit, Job, Scheduler

log = logging.getLogger("edged.server")


class Server:
    def __init__(self, config: Config, *, store=None, engine=None):
        self.config = config
        self.store = store  # a ModelStore; None = from config.models_dir / EDGED_HOME
        self._engine = engine  # a preloaded engine (tests, benchmarks)
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
        from edged.transports.mqtt import MqttTransport
        from edged.transports.unix import UnixTransport

        cfg = self.config
        self.loop = self.loop or asyncio.get_running_loop()
        engine = self._engine or await self.loop.run_in_executor(None, self._load_engine)
        self.model_info = engine.describe()
        log.info("model %s loaded (%s, %d threads)", engine.model.name, self.model_info["quantization"], self.model_info["threads"])
        self.scheduler = Scheduler(
            self._load_engine,
            queue_size=cfg.queue_size,
            keep_alive=cfg.keep_alive,
            retry_after_ms=cfg.retry_after_ms,
            engine=engine,
            batch_size=cfg.batch_size,
        )
        self._engine = None  # the scheduler owns it now (and may unload it)
        self.scheduler.start()
        if cfg.socket.enabled:
            self.transports.append(UnixTransport(self))
        if cfg.mqtt.enabled:
            self.transports.append(MqttTransport(self))
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
        """SIGHUP: re-read the config file; apply what can change live."""
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
        live = [k for k in changed if k in LIVE_KEYS]
        later = [k for k in changed if k not in LIVE_KEYS]
        new.source = self.config.source
        # Live keys take effect; the rest stays as running until a restart.
        merged = self.config
        for key in live:
            section, _, leaf = key.rpartition(".")
            obj_new = getattr(new, section) if section else new
            obj_old = getattr(merged, section) if section else merged
            setattr(obj_old, leaf, getattr(obj_new, leaf))
        if self.scheduler is not None:
            self.scheduler.queue_size = merged.queue_size
            self.scheduler.keep_alive = merged.keep_alive
            self.scheduler.retry_after_ms = merged.retry_after_ms
            with self.scheduler._cv:
                self.scheduler._cv.notify_all()  # a new keep_alive re-arms the idle timer
        logging.getLogger("edged").setLevel(merged.log_level.upper())
        if live:
            log.info("reloaded: applied %s", ", ".join(live))
        else:
            log.info("reloaded: nothing to change")
        if later:
            log.warning("reloaded: %s changed but need a restart to take effect", ", ".join(later))
        for t in self.transports:
            if hasattr(t, "reconfigure"):
                t.reconfigure()
        self._fire(self.on_reloaded)

    def _fire(self, callbacks) -> None:
        for cb in list(callbacks):
            try:
                cb(self)
            except Exception:
                log.exception("lifecycle callback %r failed", cb)

    def _load_engine(self):
        from edged.engine.engine import Engine
        from edged.engine.runner import EngineConfig
        from edged.models.store import ModelStore

        store = self.store
        if store is None:
            from pathlib import Path

            store = ModelStore(Path(self.config.models_dir)) if self.config.models_dir else ModelStore()
        engine_cfg = EngineConfig(threads=self.config.threads, **dataclasses.asdict(self.config.engine))
        return Engine.load(self.config.model, config=engine_cfg, store=store)

    # -- requests (called by transports, from any thread) -----------------------
    def handle(self, frame: Frame, emit: Emit, *, scope: str, deadline: float | None = None) -> None:
        """Answer or queue one validated frame. Always leads to exactly one final
        frame through `emit` (for generations, possibly after deltas)."""
        try:
            if frame.op in protocol.GEN_OPS:
                self._submit(frame, emit, scope, deadline)
            elif frame.op == "cancel":
                ok = self.scheduler.cancel(scope, frame.target) if self.scheduler else False
                emit(protocol.reply_frame(frame.id, {"target": frame.target, "cancelled": ok}), True)
            elif frame.op == "status":
                emit(protocol.reply_frame(frame.id, {"status": self.status()}), True)
            elif frame.op == "health":
                emit(protocol.reply_frame(frame.id, {"health": "ok" if self.ready else "starting"}), True)
            elif frame.op == "models":
                emit(protocol.reply_frame(frame.id, {"models": self.models()}), True)
        except EdgedError as e:
            emit(protocol.error_frame(frame.id, e), True)

    def _submit(self, frame: Frame, emit: Emit, scope: str, deadline: float | None) -> None:
        sched = self.scheduler
        if sched is None:
            raise ShuttingDown("the daemon is shutting down")
        name = self.model_info.get("name")
        if frame.model is not None and frame.model != name and frame.model.split(":")[0] != name:
            raise ModelNotFound(f"model {frame.model!r} is not loaded; this daemon serves {name!r}", field="model")
        if frame.timeout_ms is not None:
            d = time.monotonic() + frame.timeout_ms / 1000
            deadline = d if deadline is None else min(deadline, d)
        elif deadline is None and self.config.default_timeout:
            deadline = time.monotonic() + self.config.default_timeout
        sched.submit(Job(frame=frame, emit=emit, scope=scope, deadline=deadline))

    # -- status ----------------------------------------------------------------
    def status(self) -> dict:
        s = self.scheduler
        running = s.running if s else None
        info = self.model_info
        gov = self.governor.status() if self.governor is not None and hasattr(self.governor, "status") else None
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
            "in_flight": running.id if running is not None else None,
            "tokens_per_second": s.tokens_per_second() if s else None,
            "requests_completed": s.completed if s else 0,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "rss_bytes": rss_bytes(),
            "transports": {t.name: t.describe() for t in self.transports},
            "governor": gov,
        }

    def models(self) -> list[dict]:
        info = dict(self.model_info)
        info["loaded"] = bool(self.scheduler and self.scheduler.engine is not None)
        return [info]


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


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
    server = Server(config, **kwargs)
    from edged.ops.wiring import attach

    attach(server)  # governor + sd_notify/watchdog/journald (no-ops outside systemd)
    asyncio.run(server.serve())
    return 0

