"""firmware-config/: each board's edged.yaml loads with the daemon's own config validation and
agrees with the governor's code profile, the systemd drop-in and the units; every line says why."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edged.ops.governor import MB, PROFILES, Governor
from edged.ops.sources import Sources
from edged.serve.config import Config

REPO = Path(__file__).resolve().parents[2]
FW = REPO / "firmware-config"
BOARDS = ["pi4", "pi5", "zero2w"]


def _size(v: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", v)
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def _unit_keys(text: str) -> dict:
    return dict(l.split("=", 1) for l in text.splitlines() if "=" in l and not l.startswith("#"))


@pytest.mark.parametrize("board", BOARDS)
def test_profile_loads_with_the_daemon_validation(board, tmp_path):
    cfg = Config.load(FW / board / "edged.yaml", env={})
    g = cfg.governor
    assert g.board == board and g.enabled and g.validate() == []
    assert g.zone_type == "cpu-thermal"
    # the same thresholds as the code profile (edged.ops.governor.PROFILES)
    code = PROFILES[board]
    assert (g.warm_c, g.hot_c, g.critical_c, g.threads) == (code["warm_c"], code["hot_c"], code["critical_c"],
                                                             code["threads"])
    # act before the firmware caps the clock (80 C on Pi 4/5; Zero 2 W temp_limit=80)
    assert g.critical_c <= 80 and g.warm_c < g.hot_c < g.critical_c
    assert max(g.threads) == cfg.engine.threads
    # the socket unit's path
    listen = _unit_keys((REPO / "systemd/edged.socket").read_text())["ListenStream"]
    assert cfg.socket.path == listen
    # memory limits match the systemd drop-in
    unit = _unit_keys((FW / board / "edged.service.d/memory.conf").read_text())
    high, hard = _size(unit["MemoryHigh"]), _size(unit["MemoryMax"])
    assert high < hard
    assert g.critical_mb < g.tight_mb and (g.reserve_mb + g.tight_mb) * MB < high // 2
    assert cfg.shutdown_grace < 30  # TimeoutStopSec=30s
    # the governor built from this config runs against a fake tree at this board's limits
    root = tmp_path / "root"
    (root / "sys/fs/cgroup/edged").mkdir(parents=True)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/edged\n")
    for name, val in (("memory.current", high - (g.reserve_mb + g.critical_mb // 2) * MB),
                      ("memory.high", high), ("memory.max", hard)):
        (root / "sys/fs/cgroup/edged" / name).write_text(str(val))
    gov = Governor(g, Sources(root, use_vcgencmd=False), cores=4)
    gov.update()
    assert gov.memory_state == "critical" and gov.admit(tokens=1).code == "busy"


@pytest.mark.parametrize("board", BOARDS)
def test_every_setting_line_is_commented(board):
    for name in ("config.txt", "sysctl.conf", "zram.conf", "edged.service.d/memory.conf", "cmdline.txt"):
        lines = (FW / board / name).read_text().splitlines()
        group_has_comment = False
        for line in lines:
            s = line.strip()
            if not s:
                group_has_comment = False
            elif s.startswith("#"):
                group_has_comment = True
            elif not s.startswith("["):
                assert group_has_comment, f"{board}/{name}: {s!r} has no comment saying why"
    for line in (FW / board / "edged.yaml").read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#") and not s.endswith(":"):
            assert "#" in s, f"{board}/edged.yaml: {s!r} has no comment saying why"


@pytest.mark.parametrize("board", BOARDS)
def test_boot_files(board):
    cmd = [l for l in (FW / board / "cmdline.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert len(cmd) == 1 and "psi=1" in cmd[0].split() and "cgroup_enable=memory" in cmd[0].split()
    cfg = _unit_keys((FW / board / "config.txt").read_text())
    assert cfg["arm_64bit"] == "1"
    if board != "pi5":
        assert int(cfg["gpu_mem"]) == 16


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("board", BOARDS)
def test_dropin_verifies_with_the_unit(board, tmp_path):
    from helpers import edged_exe

    svc = (REPO / "systemd/edged.service").read_text().replace("/opt/edged/venv/bin/edged", edged_exe())
    (tmp_path / "edged.service").write_text(svc)
    shutil.copy(REPO / "systemd/edged.socket", tmp_path)
    d = tmp_path / "edged.service.d"
    d.mkdir()
    shutil.copy(FW / board / "edged.service.d/memory.conf", d)
    out = subprocess.run(["systemd-analyze", "verify", "./edged.service"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "edged" not in out.stdout + out.stderr, out.stdout + out.stderr
