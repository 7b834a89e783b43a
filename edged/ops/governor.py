"""Thermal and memory governor.

Reads `sources.Sources` every `interval` seconds and keeps two states:

- a thermal level, normal < warm < hot < critical, from the CPU zone's
  temperature with hysteresis (up as soon as a threshold is reached, down only
  once the temperature is `hysteresis_c` below the threshold that raised it)
  and from the firmware's *current* throttle flags (under-voltage -> at least
  warm; ARM frequency capped, throttled or soft temperature limit -> at least
  hot). Each level has actions: a core count for inference (`threads`), a duty
  cycle for pacing between tokens (`duty`), a token cap for new requests
  (`token_cap`); at critical, new work is refused with a busy error carrying
  `retry_after_ms` while the running stream finishes slowly.
- a memory state, ok < tight < critical, from the headroom (MemAvailable, the
  cgroup's memory.high/max minus memory.current, an optional own limit, each
  minus `reserve_mb`), PSI and new memory.events. tight shrinks the context a
  new request may use; critical refuses new work and asks for an idle model
  to be unloaded. A request whose KV cache would not fit the headroom is
  refused, as is loading a model that would not fit (`InsufficientMemory`).

Integration (see docs/operations.md): `admit(...)` as the scheduler's admission
hook, `pace()` as its per-token hook, `listeners` for level changes,
`status()`/`status_line()` for `edged status`, MQTT and systemd's STATUS=.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from edged.errors import Busy, EdgedError
from edged.settings import live
from edged.ops.sources import Sample, Sources, decode_throttled, rss_bytes

log = logging.getLogger("edged.governor")

LEVELS = ("normal", "warm", "hot", "critical")
MEMORY_STATES = ("ok", "tight", "critical")
NORMAL, WARM, HOT, CRITICAL = range(4)

# Current throttle flag bit -> the least level it implies.
FLAG_FLOOR = {0: WARM, 1: HOT, 2: HOT, 3: HOT}

MB = 1 << 20


class InsufficientMemory(EdgedError):
    """A request's KV cache or a model would not fit the memory the daemon may use."""

    code = "insufficient_memory"


@dataclass(kw_only=True)
class GovernorConfig:
    """Thresholds and actions. Lists are per level: normal, warm, hot, critical."""

    enabled: bool = True
    board: str = "generic"
    zone_type: str | None = None  # thermal zone type to follow; None = first known CPU type
    root: str = "/"  # where /sys and /proc are read (tests point it at a fake tree)
    vcgencmd: bool = False  # ask `vcgencmd get_throttled` when the sysfs file is absent (needs group video)
    interval: float = 2.0  # seconds between samples
    warm_c: float = live(70.0)
    hot_c: float = live(75.0)
    critical_c: float = live(80.0)
    hysteresis_c: float = live(5.0)
    # Cores for inference per level; 0 = all allowed cores.
    threads: list[int] = live(factory=lambda: [0, 0, 1, 1])
    # Fraction of wall time spent computing during a generation (1.0 = no pacing).
    duty: list[float] = live(factory=lambda: [1.0, 0.75, 0.5, 0.25])
    # Largest num_predict for new requests; 0 = no cap.
    token_cap: list[int] = live(factory=lambda: [0, 0, 256, 64])
    retry_after_ms: int = live(30_000)  # busy hint while critical
    use_throttle_flags: bool = True
    # Memory
    reserve_mb: int = live(64)  # kept free beyond everything we admit
    memory_limit_mb: int | None = live(None)  # our own ceiling when no cgroup limit applies
    tight_mb: int = live(128)  # headroom below this: memory state tight
    critical_mb: int = live(32)  # headroom below this: memory state critical
    psi_tight: float = live(10.0)  # PSI some avg10 (%) at which memory is tight
    psi_critical: float = live(5.0)  # PSI full avg10 (%) at which memory is critical
    load_factor: float = live(1.3)  # a model needs this many times its file size to load

    def validate(self) -> list[str]:
        errs = []
        if not self.warm_c < self.hot_c < self.critical_c:
            errs.append("warm_c < hot_c < critical_c must hold")
        if self.hysteresis_c < 0:
            errs.append("hysteresis_c must be >= 0")
        if self.interval <= 0:
            errs.append("interval must be > 0")
        for name in ("threads", "duty", "token_cap"):
            if len(getattr(self, name)) != 4:
                errs.append(f"{name} needs 4 values (normal, warm, hot, critical)")
        if any(t < 0 for t in self.threads):
            errs.append("threads must be >= 0 (0 = all cores)")
        if any(not 0 < d <= 1 for d in self.duty):
            errs.append("duty values must be in (0, 1]")
        if any(c < 0 for c in self.token_cap):
            errs.append("token_cap must be >= 0 (0 = no cap)")
        if self.critical_mb > self.tight_mb:
            errs.append("critical_mb must be <= tight_mb")
        return errs


# Board profiles. Pi 4 firmware caps the ARM clock from 80 C (soft limit, temp_soft_limit
# default 60 is for the 3B+) and hard-throttles at 85 C: act well before, at 70/75/80.
# Pi 5 throttles from 80 C too (with an active cooler it rarely gets there).
# Zero 2 W has no heatsink and 512 MB: lower thresholds and tighter memory.
PROFILES: dict[str, dict] = {
    "generic": {},
    "pi4": dict(board="pi4", zone_type="cpu-thermal", warm_c=68.0, hot_c=74.0, critical_c=79.0, hysteresis_c=5.0,
                threads=[4, 3, 2, 1]),
    "pi5": dict(board="pi5", zone_type="cpu-thermal", warm_c=70.0, hot_c=76.0, critical_c=80.0, hysteresis_c=5.0,
                threads=[4, 3, 2, 1]),
    "zero2w": dict(board="zero2w", zone_type="cpu-thermal", warm_c=65.0, hot_c=72.0, critical_c=78.0,
                   hysteresis_c=5.0, threads=[4, 2, 1, 1], token_cap=[0, 256, 128, 32],
                   reserve_mb=48, tight_mb=96, critical_mb=24),
}


def profile(name: str, **overrides) -> GovernorConfig:
    if name not in PROFILES:
        raise ValueError(f"unknown board profile {name!r}; known: {', '.join(PROFILES)}")
    return GovernorConfig(**{**PROFILES[name], **overrides})


@dataclass
class Change:
    kind: str  # "thermal" | "memory"
    old: str
    new: str
    cause: str
    at: float = field(default_factory=time.time)


class Governor:
    def __init__(self, config: GovernorConfig | None = None, sources: Sources | None = None, *,
                 cores: int | None = None):
        self.config = config or GovernorConfig()
        errs = self.config.validate()
        if errs:
            raise ValueError("governor: " + "; ".join(errs))
        self.sources = sources or Sources(self.config.root, zone_type=self.config.zone_type,
                                          use_vcgencmd=self.config.vcgencmd)
        import os

        self.cores = cores or len(os.sched_getaffinity(0))
        self.level = NORMAL
        self._thermal = NORMAL  # temperature-derived level (with hysteresis)
        self.memory = 0
        self.cause = "start"
        self.memory_cause = "start"
        self.sample: Sample | None = None
        self.headroom: int | None = None  # bytes we may still allocate
        self.kv_bytes_per_token: int | None = None  # set by whoever loads the model
        self.listeners: list[Callable[[Change], None]] = []
        self.history: list[Change] = []
        self._events_seen: dict = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_pace: float | None = None
        self.paced_s = 0.0
        self.refused = 0

    # -- sampling ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and self.config.enabled:
            self.update()
            self._thread = threading.Thread(target=self._loop, name="edged-governor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.config.interval):
            try:
                self.update()
            except Exception:  # a broken sensor must never take the daemon down
                log.exception("governor sample failed")

    def update(self, sample: Sample | None = None) -> int:
        """Take a sample (or use the given one), recompute both states, fire listeners."""
        s = sample or self.sources.sample()
        changes = []
        with self._lock:
            self.sample = s
            level, cause = self._thermal_level(s)
            if level != self.level:
                changes.append(Change("thermal", LEVELS[self.level], LEVELS[level], cause))
                self.level = level
                self.cause = cause
            mem, mcause = self._memory_state(s)
            if mem != self.memory:
                changes.append(Change("memory", MEMORY_STATES[self.memory], MEMORY_STATES[mem], mcause))
                self.memory = mem
                self.memory_cause = mcause
            self.history.extend(changes)
            del self.history[:-50]
        for ch in changes:
            logf = log.warning if (ch.kind == "thermal" and LEVELS.index(ch.new) > LEVELS.index(ch.old)) or (
                ch.kind == "memory" and MEMORY_STATES.index(ch.new) > MEMORY_STATES.index(ch.old)) else log.info
            logf("%s level %s -> %s: %s", ch.kind, ch.old, ch.new, ch.cause)
            for cb in list(self.listeners):
                try:
                    cb(ch)
                except Exception:
                    log.exception("governor listener %r failed", cb)
        return self.level

    def _thermal_level(self, s: Sample) -> tuple[int, str]:
        c = self.config
        up = (None, c.warm_c, c.hot_c, c.critical_c)
        causes = []
        if s.temp_c is not None:
            t = s.temp_c
            target = max((lvl for lvl in (WARM, HOT, CRITICAL) if t >= up[lvl]), default=NORMAL)
            if target > self._thermal:
                self._thermal = target
                causes.append(f"{s.zone} at {t:.1f} C >= {up[target]:.1f} C")
            else:
                was = self._thermal
                while self._thermal > NORMAL and t < up[self._thermal] - c.hysteresis_c:
                    self._thermal -= 1
                if self._thermal != was:
                    causes.append(f"{s.zone} at {t:.1f} C < {up[was]:.1f} - {c.hysteresis_c:.1f} C")
        floor = NORMAL
        if c.use_throttle_flags and s.throttled is not None:
            now = decode_throttled(s.throttled)["now"]
            for bit, lvl in FLAG_FLOOR.items():
                if s.throttled & (1 << bit):
                    floor = max(floor, lvl)
            if floor > self._thermal:
                causes.append(f"firmware throttle flags {', '.join(now)} ({s.throttled:#x})")
        level = max(self._thermal, floor)
        if level != self.level and not causes:
            causes.append("throttle flags cleared" if level < self.level else "throttle flags")
        return level, "; ".join(causes) or self.cause

    def _memory_state(self, s: Sample) -> tuple[int, str]:
        c = self.config
        reserve = c.reserve_mb * MB
        rooms = []
        if s.mem_available is not None:
            rooms.append((s.mem_available - reserve, f"MemAvailable {s.mem_available // MB} MiB"))
        cg = s.cgroup
        if cg is not None:
            for key in ("high", "max"):
                if cg.get(key) is not None:
                    rooms.append((cg[key] - cg["current"] - reserve,
                                  f"cgroup memory.current {cg['current'] // MB} of memory.{key} {cg[key] // MB} MiB"))
        if c.memory_limit_mb is not None:
            used = rss_bytes()
            if used is not None:
                rooms.append((c.memory_limit_mb * MB - used - reserve,
                              f"RSS {used // MB} of memory_limit_mb {c.memory_limit_mb} MiB"))
        if rooms:
            room, why = min(rooms)
            self.headroom = max(0, room)
        else:
            self.headroom, why = None, ""
        state, cause = 0, "memory headroom restored"
        if self.headroom is not None and self.headroom < c.tight_mb * MB:
            state, cause = 1, f"headroom {self.headroom // MB} MiB < {c.tight_mb} MiB ({why})"
        psi = s.psi or {}
        some = (psi.get("some") or {}).get("avg10")
        full = (psi.get("full") or {}).get("avg10")
        if state < 1 and some is not None and some >= c.psi_tight:
            state, cause = 1, f"PSI memory some avg10 {some:.1f}% >= {c.psi_tight}%"
        if cg is not None:
            ev = cg.get("events") or {}
            new = {k: ev.get(k, 0) - self._events_seen.get(k, ev.get(k, 0)) for k in ("high", "max", "oom", "oom_kill")}
            self._events_seen = dict(ev)
            if new.get("max", 0) > 0 or new.get("oom", 0) > 0 or new.get("oom_kill", 0) > 0:
                state, cause = 2, f"cgroup memory.events: {', '.join(f'{k}+{v}' for k, v in new.items() if v)}"
            elif new.get("high", 0) > 0 and state < 1:
                state, cause = 1, f"cgroup memory.events: high+{new['high']}"
        if self.headroom is not None and self.headroom < c.critical_mb * MB:
            state, cause = 2, f"headroom {self.headroom // MB} MiB < {c.critical_mb} MiB ({why})"
        if full is not None and full >= c.psi_critical:
            state, cause = 2, f"PSI memory full avg10 {full:.1f}% >= {c.psi_critical}%"
        return state, cause

    # -- actions -----------------------------------------------------------------
    @property
    def level_name(self) -> str:
        return LEVELS[self.level]

    @property
    def memory_state(self) -> str:
        return MEMORY_STATES[self.memory]

    @property
    def threads(self) -> int:
        n = self.config.threads[self.level]
        return self.cores if n <= 0 else max(1, min(n, self.cores))

    @property
    def duty(self) -> float:
        return self.config.duty[self.level]

    @property
    def token_cap(self) -> int | None:
        return self.config.token_cap[self.level] or None

    @property
    def context_cap(self) -> int | None:
        """Tokens of context a new request may use (None = no cap): half the headroom
        when memory is tight, so one request cannot take what is left."""
        if self.memory < 1 or not self.kv_bytes_per_token or self.headroom is None:
            return None
        return max(16, int(self.headroom // 2 // self.kv_bytes_per_token))

    def admit(self, *, tokens: int | None = None, kv_bytes: int | None = None,
              load_bytes: int = 0) -> EdgedError | None:
        """None to admit; else the error to send. `tokens` (prompt + to predict) or
        `kv_bytes` estimate the request's KV cache; `load_bytes` is what reloading an
        unloaded model will take (its headroom was freed by the unload)."""
        if not self.config.enabled:
            return None
        with self._lock:
            if self.level >= CRITICAL:
                self.refused += 1
                return Busy(f"the board is too hot ({self.cause}); retry later",
                            retry_after_ms=self.config.retry_after_ms, reason="thermal", level=self.level_name)
            if self.memory >= 2:
                self.refused += 1
                return Busy(f"memory is critical ({self.memory_cause}); retry later",
                            retry_after_ms=self.config.retry_after_ms, reason="memory", memory=self.memory_state)
            if kv_bytes is None and tokens is not None and self.kv_bytes_per_token:
                kv_bytes = tokens * self.kv_bytes_per_token
            need = (kv_bytes or 0) + load_bytes
            if need and self.headroom is not None and need > self.headroom:
                self.refused += 1
                reload = f" plus {_mb(load_bytes)} MiB to reload the model" if load_bytes else ""
                return InsufficientMemory(
                    f"the request's KV cache needs {_mb(kv_bytes or 0)} MiB{reload} but only {_mb(self.headroom)} MiB "
                    f"may be allocated ({self.memory_cause if self.memory else 'headroom after reserve'}); "
                    f"ask for fewer tokens (options.num_predict / num_ctx)",
                    needed_bytes=need, headroom_bytes=self.headroom)
        return None

    def limit_options(self, options: dict) -> dict:
        """Clamp a new request's options dict in place to the token and context caps."""
        cap = self.token_cap
        if cap:
            n = options.get("num_predict")
            if n is None or n < 0 or n > cap:
                options["num_predict"] = cap
        ctx = self.context_cap
        if ctx:
            n = options.get("num_ctx")
            if not n or n > ctx:
                options["num_ctx"] = ctx
        return options

    def check_load(self, model_bytes: int) -> None:
        """Raise InsufficientMemory if a model of this size cannot be loaded now."""
        if not self.config.enabled:
            return
        if self.sample is None:
            self.update()
        need = int(model_bytes * self.config.load_factor)
        if self.headroom is not None and need > self.headroom:
            raise InsufficientMemory(
                f"cannot load the model: it needs about {_mb(need)} MiB ({self.config.load_factor}x its "
                f"{_mb(model_bytes)} MiB) but only {_mb(self.headroom)} MiB may be allocated; "
                f"free memory, raise MemoryHigh=/MemoryMax= or use a smaller model",
                needed_bytes=need, headroom_bytes=self.headroom)

    def should_unload(self) -> bool:
        """True while memory is critical: an idle model should be unloaded."""
        return self.config.enabled and self.memory >= 2

    def pace(self, restart: bool = False) -> float:
        """Call between tokens on the generating thread. Sleeps so that computing
        takes `duty` of the wall time; returns the seconds slept. `restart` marks the
        first token of a generation (nothing to pace yet)."""
        now = time.monotonic()
        last, self._last_pace = self._last_pace, now
        duty = self.duty if self.config.enabled else 1.0
        if restart or last is None or duty >= 1.0:
            return 0.0
        busy = now - last
        if busy > 10.0:  # an idle gap, not a token
            return 0.0
        delay = min(busy * (1.0 - duty) / duty, 5.0)
        if delay > 0:
            self._stop.wait(delay)
            self.paced_s += delay
        self._last_pace = time.monotonic()
        return delay

    # -- reporting ---------------------------------------------------------------
    def status(self) -> dict:
        s = self.sample
        with self._lock:
            return {
                "enabled": self.config.enabled,
                "board": self.config.board,
                "level": self.level_name,
                "cause": self.cause,
                "memory": self.memory_state,
                "memory_cause": self.memory_cause,
                "temp_c": s.temp_c if s else None,
                "zone": s.zone if s else None,
                "throttled": decode_throttled(s.throttled) if s and s.throttled is not None else None,
                "cpufreq": s.cpufreq if s else None,
                "mem_available": s.mem_available if s else None,
                "cgroup": {k: v for k, v in s.cgroup.items() if k != "events"} if s and s.cgroup else None,
                "psi": s.psi if s else None,
                "headroom_bytes": self.headroom,
                "threads": self.threads,
                "duty": self.duty,
                "token_cap": self.token_cap,
                "context_cap": self.context_cap,
                "refused": self.refused,
                "paced_s": round(self.paced_s, 3),
                "changes": [asdict(c) for c in self.history[-5:]],
            }

    snapshot = status

    def status_line(self) -> str:
        s = self.sample
        temp = f" {s.temp_c:.0f}C" if s and s.temp_c is not None else ""
        parts = [f"thermal {self.level_name}{temp}", f"{self.threads} cores"]
        if self.duty < 1:
            parts.append(f"duty {int(self.duty * 100)}%")
        if self.token_cap:
            parts.append(f"cap {self.token_cap}")
        parts.append(f"memory {self.memory_state}")
        if self.headroom is not None:
            parts.append(f"{self.headroom // MB} MiB free")
        return ", ".join(parts)


def _mb(n: int) -> int:
    return int(n) // MB

