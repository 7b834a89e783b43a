"""systemd integration: sd_notify (READY/RELOADING/STOPPING/STATUS/WATCHDOG),
socket activation fds and journald logging.

Uses systemd-python (the `edged[systemd]` extra) when it is installed and falls
back to a few lines of plain Python otherwise (the notify protocol is one
datagram to $NOTIFY_SOCKET). Outside systemd (no NOTIFY_SOCKET) every call is
a cheap no-op, so the daemon runs the same from a shell.

The watchdog is fed from the inference path's health, not from a timer alone:
`Notifier(health=...)` pings WATCHDOG=1 every half WatchdogSec only while
`health()` is true. `scheduler_health(scheduler)` is false when the worker
thread died or a generation has made no progress (no token) for `stall_s`, so
a wedged worker stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("edged.systemd")

try:  # the optional extra
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - exercised when the extra is absent
    _sd_daemon = None

SD_LISTEN_FDS_START = 3


def have_systemd_python() -> bool:
    return _sd_daemon is not None


def _send(state: str, env=os.environ) -> bool:
    """Send one notify datagram; False when not under systemd (or it failed)."""
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if _sd_daemon is not None and env is os.environ:
        try:
            return bool(_sd_daemon.notify(state))
        except Exception:
            log.debug("systemd.daemon.notify failed", exc_info=True)
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", addr, e)
        return False


def watchdog_interval(env=os.environ) -> float | None:
    """Seconds between pings (half of WatchdogSec), or None when the watchdog is off."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        n = int(usec)
    except ValueError:
        return None
    return n / 2e6 if n > 0 else None


def listen_fds(unset: bool = True) -> list[int]:
    """File descriptors passed by socket activation (sd_listen_fds)."""
    if _sd_daemon is not None:
        try:
            return list(_sd_daemon.listen_fds(unset_environment=unset))
        except Exception:
            pass
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))


def journal_handler(level=logging.NOTSET) -> logging.Handler | None:
    """A JournalHandler when stderr goes to the journal and systemd-python is installed.

    Extra fields: log with `extra={"REQUEST_ID": ..., "MODEL": ...}` and they become
    journal fields (`journalctl -u edged REQUEST_ID=42`)."""
    if not os.environ.get("JOURNAL_STREAM"):
        return None
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    h = JournalHandler(level=level, SYSLOG_IDENTIFIER="edged")
    return h


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """sd_notify for the daemon's lifecycle plus a health-fed watchdog thread."""

    def __init__(self, health: Callable[[], bool] | None = None, *, interval: float | None = None, env=None):
        self.env = os.environ if env is None else env
        self.health = health
        self.interval = interval if interval is not None else watchdog_interval(self.env)
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        self.pings = 0
        self.skipped = 0
        self.last_status: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    def notify(self, *lines: str) -> bool:
        if not self.enabled:
            return False
        return _send("\n".join(lines), self.env)

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status:
            self.last_status = status
            lines.append(f"STATUS={status}")
        return self.notify(*lines)

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading configuration")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: finishing in-flight requests")

    def status(self, text: str) -> bool:
        if text == self.last_status:
            return False
        self.last_status = text
        return self.notify(f"STATUS={text}")

    # -- watchdog -----------------------------------------------------------------
    def start_watchdog(self) -> None:
        if self.interval and self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="edged-watchdog", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ok = True
            if self.health is not None:
                try:
                    ok = bool(self.health())
                except Exception:
                    log.exception("health check failed")
                    ok = False
            if ok:
                self.notify("WATCHDOG=1")
                self.pings += 1
                if not self._healthy:
                    log.warning("inference worker healthy again: watchdog pings resumed")
            else:
                self.skipped += 1
                if self._healthy:
                    log.error("inference worker is not making progress: withholding watchdog pings")
            self._healthy = ok
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class Progress:
    """Heartbeat of the inference path: `beat()` per token; `healthy()` for the watchdog."""

    def __init__(self, scheduler_ref: Callable[[], object], stall_s: float = 60.0):
        self.scheduler_ref = scheduler_ref
        self.stall_s = stall_s
        self.last = time.monotonic()
        self._job = None

    def beat(self, job=None, n: int = 0) -> None:
        self.last = time.monotonic()
        self._job = job

    def healthy(self) -> bool:
        s = self.scheduler_ref()
        if s is None:  # starting, stopping, or between restarts of the scheduler
            return True
        if not s.worker_alive:
            return False
        if not s.running:
            return True
        # A job that just started is prefilling: its clock starts then, not at the last token.
        return time.monotonic() - max(self.last, s.progressed) < self.stall_s
