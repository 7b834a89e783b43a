"""Where edged keeps its state. EDGED_HOME wins; the system service sets it to
/var/lib/edged (systemd's StateDirectory=); users get the XDG data dir."""

from __future__ import annotations

import os
from pathlib import Path


def edged_home() -> Path:
    env = os.environ.get("EDGED_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "edged"


def models_dir(home: Path | None = None) -> Path:
    return (home or edged_home()) / "models"
