"""Fixtures for the governor/systemd tests: a fake sysfs/procfs tree, a real sd_notify
endpoint (helpers.NotifyListener), the CPU affinity restored after each test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import NotifyListener, unix_path


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


@pytest.fixture
def notify_socket(tmp_path):
    n = NotifyListener(unix_path(tmp_path, "notify.sock"))
    yield n
    n.close()


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
