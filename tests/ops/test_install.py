"""scripts/install.sh staged under --root (no users, no systemctl, no venv)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edged.serve.config import Config

REPO = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([str(REPO / "scripts/install.sh"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("board", ["generic", "pi4", "zero2w"])
def test_install_stages_config_and_units(tmp_path, board):
    out = run("--root", str(tmp_path), "--skip-venv", "--board", board, "--prefix", "/usr/local/edged")
    assert out.returncode == 0, out.stderr
    cfg = tmp_path / "etc/edged/edged.yaml"
    assert Config.load(cfg, env={}).governor.board == board
    svc = (tmp_path / "etc/systemd/system/edged.service").read_text()
    assert "ExecStart=/usr/local/edged/venv/bin/edged serve --config /etc/edged/edged.yaml" in svc
    assert (tmp_path / "etc/systemd/system/edged.socket").is_file()
    assert (tmp_path / "usr/local/edged/docs/operations.md").is_file()
    dropin = tmp_path / "etc/systemd/system/edged.service.d/memory.conf"
    assert dropin.is_file() == (board != "generic")
    # a second run keeps an edited config and puts the default next to it
    cfg.write_text(cfg.read_text() + "# local edit\n")
    assert run("--root", str(tmp_path), "--skip-venv", "--board", board).returncode == 0
    assert cfg.read_text().endswith("# local edit\n") and (tmp_path / "etc/edged/edged.yaml.new").is_file()


def test_install_refuses_bad_input(tmp_path):
    assert run("--board", "pi9", "--root", str(tmp_path)).returncode == 2
    assert run("--bogus").returncode == 2


def test_make_install_target_exists():
    out = subprocess.run(["make", "-n", "install", "BOARD=pi5", "INSTALL_ARGS=--no-enable"], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "scripts/install.sh --board pi5 --no-enable" in out.stdout
