"""Readers for the governor's inputs: thermal zones, Pi firmware throttle flags,
cpufreq, /proc/meminfo, the daemon's own cgroup v2 memory files and PSI.

Every reader takes a `root` ("/" on a real system) so tests drive a fake tree
made of plain files. A missing or unreadable file yields None, never an
exception: a board without PSI, cpufreq or a thermal zone still runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

# Thermal zone types that are the CPU/SoC on the boards we care about, best first.
CPU_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "soc_thermal", "x86_pkg_temp", "cpu", "soc", "acpitz")

# Bits of the firmware's get_throttled word (same layout as `vcgencmd get_throttled`).
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
}
SINCE_BOOT_SHIFT = 16

FIRMWARE_THROTTLED = "sys/devices/platform/soc/soc:firmware/get_throttled"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass
class ThermalZone:
    name: str
    type: str
    temp_c: float


def read_thermal_zones(root: Path) -> list[ThermalZone]:
    zones = []
    base = root / "sys/class/thermal"
    try:
        entries = sorted(base.glob("thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    except OSError:
        return zones
    for z in entries:
        milli = _int(_read(z / "temp"))
        if milli is None:
            continue
        zones.append(ThermalZone(z.name, _read(z / "type") or "", milli / 1000.0))
    return zones


def pick_cpu_zone(zones: list[ThermalZone], zone_type: str | None = None) -> ThermalZone | None:
    """The configured zone type, else the first known CPU type, else the hottest zone."""
    if not zones:
        return None
    wanted = (zone_type,) if zone_type else CPU_ZONE_TYPES
    for t in wanted:
        for z in zones:
            if z.type == t:
                return z
    if zone_type:
        return None  # configured but absent: do not silently follow another sensor
    return max(zones, key=lambda z: z.temp_c)


def parse_throttled(text: str | None) -> int | None:
    """'0x50005', 'throttled=0x50005' or '50005' (sysfs prints hex without 0x)."""
    if not text:
        return None
    text = text.strip().rpartition("=")[2]
    try:
        return int(text, 16)
    except ValueError:
        return None


def decode_throttled(word: int | None) -> dict:
    if word is None:
        return {}
    now = [name for bit, name in THROTTLE_BITS.items() if word & (1 << bit)]
    boot = [name for bit, name in THROTTLE_BITS.items() if word & (1 << (bit + SINCE_BOOT_SHIFT))]
    return {"raw": f"0x{word:x}", "now": now, "since_boot": boot}


def read_throttled(root: Path, *, use_vcgencmd: bool = True) -> int | None:
    word = parse_throttled(_read(root / FIRMWARE_THROTTLED))
    if word is not None or not use_vcgencmd or str(root) != "/":
        return word
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_throttled(out.stdout) if out.returncode == 0 else None


def read_cpufreq(root: Path, cpu: int = 0) -> dict | None:
    base = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
    cur = _int(_read(base / "scaling_cur_freq"))
    if cur is None:
        return None
    return {
        "cur_khz": cur,
        "max_khz": _int(_read(base / "scaling_max_freq")),
        "hw_max_khz": _int(_read(base / "cpuinfo_max_freq")),
    }


def rss_bytes() -> int | None:
    """This process's resident memory."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def read_meminfo(root: Path) -> dict:
    out = {}
    text = _read(root / "proc/meminfo") or ""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree") and parts:
            out[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


def own_cgroup(root: Path) -> str | None:
    """The cgroup v2 path of this process ('0::/system.slice/edged.service')."""
    text = _read(root / "proc/self/cgroup") or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def _limit(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    return _int(text)


def own_cgroup_v1(root: Path) -> str | None:
    """The cgroup v1 memory-controller path ('4:memory:/edged'), for hybrid hosts."""
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            return parts[2] or "/"
    return None


def read_cgroup_v1_memory(root: Path, cgroup: str | None = None) -> dict | None:
    """cgroup v1 fallback: usage_in_bytes, limit_in_bytes (as max), failcnt (as max events)."""
    cg = cgroup if cgroup is not None else own_cgroup_v1(root)
    if cg is None:
        return None
    base = root / "sys/fs/cgroup/memory" / cg.lstrip("/")
    current = _int(_read(base / "memory.usage_in_bytes"))
    if current is None:
        return None
    limit = _int(_read(base / "memory.limit_in_bytes"))
    events = {"max": _int(_read(base / "memory.failcnt")) or 0}
    for line in (_read(base / "memory.oom_control") or "").splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill" and _int(v) is not None:
            events["oom_kill"] = int(v)
    return {
        "path": cg,
        "version": 1,
        "current": current,
        "high": None,
        "max": limit if limit is not None and limit < (1 << 62) else None,
        "events": events,
    }


def read_cgroup_memory(root: Path, cgroup: str | None = None) -> dict | None:
    cg = cgroup if cgroup is not None else own_cgroup(root)
    base = root / "sys/fs/cgroup" / (cg or "").lstrip("/")
    current = _int(_read(base / "memory.current")) if cg is not None else None
    if current is None:
        return read_cgroup_v1_memory(root) if cgroup is None else None
    events = {}
    for line in (_read(base / "memory.events") or "").splitlines():
        k, _, v = line.partition(" ")
        if _int(v) is not None:
            events[k] = int(v)
    return {
        "path": cg,
        "version": 2,
        "current": current,
        "high": _limit(_read(base / "memory.high")),
        "max": _limit(_read(base / "memory.max")),
        "events": events,
    }


def read_psi(root: Path, resource: str = "memory") -> dict | None:
    """{'some': {'avg10':..,'avg60':..,'avg300':..,'total':..}, 'full': {...}}; None without PSI."""
    text = _read(root / "proc/pressure" / resource)
    if not text:
        return None
    out = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        vals = {}
        for f in fields:
            k, _, v = f.partition("=")
            try:
                vals[k] = float(v) if k != "total" else int(v)
            except ValueError:
                pass
        out[kind] = vals
    return out


@dataclass
class Sample:
    """One reading of every source; None where the source does not exist."""

    t: float = field(default_factory=time.monotonic)
    temp_c: float | None = None
    zone: str | None = None
    zones: list[ThermalZone] = field(default_factory=list)
    throttled: int | None = None
    cpufreq: dict | None = None
    mem_available: int | None = None
    mem_total: int | None = None
    cgroup: dict | None = None
    psi: dict | None = None


class Sources:
    """Reads everything under `root`. `zone_type` picks the CPU thermal zone."""

    def __init__(self, root: str | os.PathLike = "/", *, zone_type: str | None = None, cgroup: str | None = None,
                 use_vcgencmd: bool = True):
        self.root = Path(root)
        self.zone_type = zone_type
        self.cgroup = cgroup
        self.use_vcgencmd = use_vcgencmd

    def sample(self) -> Sample:
        zones = read_thermal_zones(self.root)
        zone = pick_cpu_zone(zones, self.zone_type)
        mem = read_meminfo(self.root)
        return Sample(
            temp_c=zone.temp_c if zone else None,
            zone=f"{zone.name}:{zone.type}" if zone else None,
            zones=zones,
            throttled=read_throttled(self.root, use_vcgencmd=self.use_vcgencmd),
            cpufreq=read_cpufreq(self.root),
            mem_available=mem.get("MemAvailable"),
            mem_total=mem.get("MemTotal"),
            cgroup=read_cgroup_memory(self.root, self.cgroup),
            psi=read_psi(self.root),
        )
