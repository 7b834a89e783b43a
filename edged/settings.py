"""Marking configuration fields that a running daemon applies on SIGHUP."""

from __future__ import annotations

import dataclasses
from typing import Any

_LIVE = {"live": True}


def live(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that SIGHUP applies without a restart."""
    return dataclasses.field(default=default, default_factory=factory, metadata=_LIVE)


def is_live(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("live"))
