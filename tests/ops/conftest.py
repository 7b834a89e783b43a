"""Fixtures for the governor/systemd tests: a fake sysfs/procfs tree."""

from __future__ import annotations

from pathlib import Path

import pytest


class FakeSys:
    """A plain-file tree shaped like /sys and /proc, written by the test."""

    def __init__(self, root: Path):
        self.root = root
        self.cgroup_path = "/system.slice/edged.service"
        self.zone("thermal_zone0", "cpu-thermal", 40.0)
        self.zone("thermal_zone1", "gpu-thermal", 30.0)
        self.write("proc/self/cgroup", f"0::{self.cgroup_path}\n")
        self.meminfo(available_mb=3000, total_mb=4000)
        self.cpufreq(cur_khz=1500000, max_khz=1500000)

    def write(self, rel: str, text: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def zone(self, name: str, type_: str, temp_c: float) -> None:
        self.write(f"sys/class/thermal/{name}/type", type_ + "\n")
        self.write(f"sys/class/thermal/{name}/temp", f"{int(temp_c * 1000)}\n")

    def temp(self, temp_c: float) -> None:
        self.write("sys/class/thermal/thermal_zone0/temp", f"{int(temp_c * 1000)}\n")

    def throttled(self, word: int | None) -> None:
        p = self.root / "sys/devices/platform/soc/soc:firmware/get_throttled"
        if word is None:
            p.unlink(missing_ok=True)
        else:
            self.write("sys/devices/platform/soc/soc:firmware/get_throttled", f"{word:x}\n")

    def cpufreq(self, cur_khz: int, max_khz: int) -> None:
        base = "sys/devices/system/cpu/cpu0/cpufreq"
        self.write(f"{base}/scaling_cur_freq", f"{cur_khz}\n")
        self.write(f"{base}/scaling_max_freq", f"{max_khz}\n")
        self.write(f"{base}/cpuinfo_max_freq", f"{max_khz}\n")

    def meminfo(self, available_mb: int, total_mb: int = 4000) -> None:
        self.write(
            "proc/meminfo",
            f"MemTotal:       {total_mb * 1024} kB\nMemFree:        100 kB\nMemAvailable:   {available_mb * 1024} kB\n",
        )

    def cgroup(self, current_mb: int, high_mb: int | None = None, max_mb: int | None = None, **events) -> None:
        base = f"sys/fs/cgroup{self.cgroup_path}"
        self.write(f"{base}/memory.current", f"{current_mb << 20}\n")
        self.write(f"{base}/memory.high", "max\n" if high_mb is None else f"{high_mb << 20}\n")
        self.write(f"{base}/memory.max", "max\n" if max_mb is None else f"{max_mb << 20}\n")
        ev = {"low": 0, "high": 0, "max": 0, "oom": 0, "oom_kill": 0, **events}
        self.write(f"{base}/memory.events", "".join(f"{k} {v}\n" for k, v in ev.items()))

    def psi(self, some10: float, full10: float = 0.0) -> None:
        self.write(
            "proc/pressure/memory",
            f"some avg10={some10:.2f} avg60=0.00 avg300=0.00 total=1\nfull avg10={full10:.2f} avg60=0.00 avg300=0.00 total=1\n",
        )


@pytest.fixture
def fakesys(tmp_path) -> FakeSys:
    return FakeSys(tmp_path / "root")


import os
import socket
import subprocess
import sys
import threading
import time

import yaml

WAIT = 120.0


class NotifyListener:
    """A real sd_notify endpoint: a bound AF_UNIX datagram socket collecting messages."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self.cv = threading.Condition()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.cv:
                self.messages.append((time.monotonic(), fields))
                self.cv.notify_all()

    def wait(self, pred, timeout: float = WAIT, what: str = "a notify message") -> tuple[float, dict]:
        """The first message (from the start) satisfying pred."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                for t, m in self.messages:
                    if pred(m):
                        return t, m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.messages[-10:]}")
                self.cv.wait(left)

    def count(self, key: str, since: float = 0.0) -> int:
        with self.cv:
            return sum(1 for t, m in self.messages if key in m and t >= since)

    def close(self):
        self._stop = True
        self._t.join(timeout=2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    n = NotifyListener(str(tmp_path / "notify.sock"))
    yield n
    n.close()


def edged_exe() -> str:
    return str(Path(sys.executable).with_name("edged"))


class Daemon:
    """`edged serve` as a real subprocess with its own config file and log."""

    def __init__(self, tmp: Path, cfg: dict, *, env: dict | None = None, argv_prefix=(), **popen):
        self.cfg_path = tmp / "edged.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "daemon.log"
        self.log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
        full_env.update({"EDGED_HOME": str(tmp / "home"), **(env or {})})
        self.proc = subprocess.Popen([*argv_prefix, edged_exe(), "serve", "--config", str(self.cfg_path)],
                                     env=full_env, stdout=self.log, stderr=subprocess.STDOUT, **popen)

    def logtext(self) -> str:
        return self.log_path.read_text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def daemon_config(tmp: Path, models_dir, **over) -> dict:
    cfg = {
        "model": "tiny",
        "models_dir": str(models_dir),
        "keep_alive": -1,
        "log_level": "info",
        "socket": {"path": str(tmp / "edged.sock")},
        "mqtt": {"enabled": False},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(autouse=True)
def _restore_cpu_affinity():
    """The governor's core cap pins every thread of the process: undo it after each test."""
    allowed = os.sched_getaffinity(0)
    yield
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), allowed)
        except OSError:
            pass
