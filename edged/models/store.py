"""The model store: $EDGED_HOME/models/NAME/ with a manifest, edged-model.json.

A model becomes visible in one rename: conversion writes into a hidden staging
folder (".staging-*") and `install` renames it into place only when every file
and the manifest are written. `list` ignores anything without a manifest or
whose name starts with a dot, so a crashed or interrupted convert leaves no half
model behind (and the next convert or `edged rm` sweeps the leftovers).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edged.errors import ModelCorrupt, ModelNotFound
from edged.paths import models_dir

MANIFEST = "edged-model.json"
FORMAT_VERSION = 1
_VERIFIED = ".verified.json"  # fast-path cache: (size, mtime_ns, inode) of files whose sha256 matched
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_', ':' or '-' (max 64)")
    return name


@dataclass
class Model:
    """An installed model folder and its manifest."""

    name: str
    path: Path
    manifest: dict

    def file(self, key: str) -> Path:
        return self.path / self.manifest["files_by_role"][key]

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values())


class ModelStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else models_dir()

    # -- reading -------------------------------------------------------------
    def list(self) -> list[Model]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST).is_file():
                continue
            try:
                out.append(Model(d.name, d, json.loads((d / MANIFEST).read_text())))
            except (OSError, ValueError):
                continue  # unreadable manifest: `show`/`load` report it, `list` skips it
        return out

    def get(self, name: str) -> Model:
        d = self.root / name
        if name.startswith(".") or not (d / MANIFEST).is_file():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise ModelNotFound(f"model {name!r} not found in {self.root} (installed: {known}; try `edged pull {name}`)")
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except ValueError as e:
            raise ModelCorrupt(f"model {name!r}: manifest {d / MANIFEST} is not valid JSON ({e})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ModelCorrupt(
                f"model {name!r} was prepared by an incompatible edged (format {manifest.get('format_version')}, "
                f"expected {FORMAT_VERSION}); run `edged rm {name}` and pull or convert it again"
            )
        return Model(name, d, manifest)

    def verify(self, model: Model, *, mode: str = "fast") -> None:
        """Raise ModelCorrupt naming the file that is missing or altered."""
        if mode == "none":
            return
        cache_path = model.path / _VERIFIED
        cache: dict = {}
        if mode == "fast":
            try:
                cache = json.loads(cache_path.read_text())
            except (OSError, ValueError):
                cache = {}
        fresh = {}
        for fname, meta in model.manifest["files"].items():
            p = model.path / fname
            try:
                st = p.stat()
            except FileNotFoundError:
                raise ModelCorrupt(
                    f"model {model.name!r} is incomplete: {fname} is missing from {model.path}; "
                    f"run `edged rm {model.name}` and prepare it again"
                ) from None
            if st.st_size != meta["size"]:
                raise ModelCorrupt(
                    f"model {model.name!r} is corrupt: {fname} has {st.st_size} bytes, manifest says {meta['size']}"
                )
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
            if cache.get(fname) == stamp:
                fresh[fname] = stamp
                continue
            if sha256_file(p) != meta["sha256"]:
                raise ModelCorrupt(
                    f"model {model.name!r} is corrupt: sha256 of {fname} does not match the manifest; "
                    f"run `edged rm {model.name}` and prepare it again"
                )
            fresh[fname] = stamp
        try:
            _atomic_write(cache_path, json.dumps(fresh))
        except OSError:
            pass  # read-only store: verification still happened, only the cache is not kept

    # -- writing -------------------------------------------------------------
    def staging(self, name: str) -> Path:
        check_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-{name}-", dir=self.root))

    def install(self, staging: Path, name: str, manifest: dict) -> Model:
        """Hash the staged files, write the manifest, then rename into place."""
        check_name(name)
        files = {}
        for p in sorted(staging.iterdir()):
            if p.is_file() and p.name not in (MANIFEST, _VERIFIED):
                files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        manifest = {
            **manifest,
            "format_version": FORMAT_VERSION,
            "name": name,
            "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        _atomic_write(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the service user and group read models
        _fsync_dir(staging)
        final = self.root / name
        old = None
        if final.exists():
            old = self.root / f".old-{name}-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(final, old)
        os.rename(staging, final)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Model(name, final, manifest)

    def remove(self, name: str) -> None:
        model = self.get(name)
        trash = self.root / f".old-{name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(model.path, trash)  # disappears from `list` at once, even if rmtree is interrupted
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> None:
        """Delete leftovers of interrupted conversions and removals."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.name.startswith(".staging-"):
                pid = d.name.split("-")[1]
                if pid.isdigit() and int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}"):
                    continue  # another convert is still writing it
                shutil.rmtree(d, ignore_errors=True)
            elif d.name.startswith(".old-"):
                shutil.rmtree(d, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
