"""Manifest of an aarch64 bundle: what build-arm.sh put in it, checked before it ships.

    python bundle.py write BUNDLE --onnxruntime 1.22.1 [--gate GATE.json] [--verify VERIFY.json]
    python bundle.py check BUNDLE

`write` refuses a bundle that could not work on the Pi (rules below), then writes
BUNDLE/constraints.txt (exact version of every wheel, used by install.sh) and
BUNDLE/bundle.json (wheels, models, sha256 of every file). `check` re-hashes.
Standard library only: it runs on the build host and on the Pi.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

# Conversion tooling never goes onto the device.
FORBIDDEN = {"torch", "transformers", "optimum", "optimum-onnx", "accelerate", "onnx", "gguf", "safetensors",
             "nvidia-cublas-cu12", "triton"}
REQUIRED = {"edged", "onnxruntime", "tokenizers", "numpy", "pyyaml", "jinja2", "markupsafe", "paho-mqtt"}
PYTHON_TAG = "cp311"  # Raspberry Pi OS bookworm / Debian 12
MAX_GLIBC = (2, 36)  # bookworm's glibc
MANIFEST = "bundle.json"

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


class BundleError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(filename: str) -> dict:
    m = _WHEEL.match(filename)
    if not m:
        raise BundleError(f"{filename}: not a wheel file name")
    return {
        "file": filename,
        "name": canonical(m["name"]),
        "version": m["version"],
        "python": m["py"].split("."),
        "abi": m["abi"].split("."),
        "platform": m["plat"].split("."),
    }


def platform_ok(tags: list[str]) -> bool:
    """True when one tag installs on aarch64 glibc <= MAX_GLIBC."""
    for t in tags:
        if t == "any":
            return True
        if t in ("linux_aarch64", "manylinux2014_aarch64"):
            return t == "manylinux2014_aarch64"  # bare linux_ wheels are not portable
        m = re.match(r"^manylinux_(\d+)_(\d+)_aarch64$", t)
        if m and (int(m[1]), int(m[2])) <= MAX_GLIBC:
            return True
    return False


def python_ok(w: dict) -> bool:
    return any(p in ("py3", PYTHON_TAG) or p.startswith("py3") or (p == "cp310" and "abi3" in w["abi"])
               or (p.startswith("cp3") and "abi3" in w["abi"] and int(p[3:]) <= 11) for p in w["python"])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def inspect(bundle: Path, onnxruntime: str | None = None) -> dict:
    """Check the bundle's wheels and models; return the manifest (without file hashes)."""
    wheels_dir = bundle / "wheels"
    if not wheels_dir.is_dir():
        raise BundleError(f"{bundle}: no wheels/ folder")
    wheels = [parse_wheel(p.name) for p in sorted(wheels_dir.glob("*.whl"))]
    problems = []
    names: dict[str, dict] = {}
    for w in wheels:
        if w["name"] in names:
            problems.append(f"two versions of {w['name']}: {names[w['name']]['file']} and {w['file']}")
        names[w["name"]] = w
        if w["name"] in FORBIDDEN:
            problems.append(f"{w['file']}: conversion tooling ({w['name']}) must not go onto the device")
        if not platform_ok(w["platform"]):
            problems.append(f"{w['file']}: not installable on aarch64 with glibc {MAX_GLIBC[0]}.{MAX_GLIBC[1]}")
        if not python_ok(w):
            problems.append(f"{w['file']}: not for CPython 3.11")
    for req in sorted(REQUIRED - set(names)):
        problems.append(f"missing wheel: {req}")
    ort = names.get("onnxruntime")
    if ort and onnxruntime and ort["version"] != onnxruntime:
        problems.append(f"onnxruntime {ort['version']} bundled, but the pin is {onnxruntime}")
    models = []
    for man_path in sorted((bundle / "models").glob("*/edged-model.json")):
        man = json.loads(man_path.read_text())
        if man.get("target") != "arm64":
            problems.append(f"model {man_path.parent.name}: target {man.get('target')!r}, not arm64")
        for fname in man.get("files", {}):
            if not (man_path.parent / fname).is_file():
                problems.append(f"model {man_path.parent.name}: {fname} is missing")
        models.append({
            "name": man_path.parent.name,
            "scheme": man.get("quantization", {}).get("scheme"),
            "target": man.get("target"),
            "gate": man.get("gate", {}).get("status"),
            "size": sum(f["size"] for f in man.get("files", {}).values()),
        })
    if not models:
        problems.append("no model under models/")
    if problems:
        raise BundleError("bundle refused:\n  " + "\n  ".join(problems))
    return {
        "format": 1,
        "python": PYTHON_TAG,
        "onnxruntime": ort["version"] if ort else None,
        "wheels": {w["name"]: {"version": w["version"], "file": w["file"]} for w in wheels},
        "models": models,
    }


def constraints(manifest: dict) -> str:
    return "".join(f"{n}=={w['version']}\n" for n, w in sorted(manifest["wheels"].items()))


def write(bundle: Path, onnxruntime: str | None, extra: dict) -> dict:
    man = inspect(bundle, onnxruntime)
    man.update(extra)
    (bundle / "constraints.txt").write_text(constraints(man))
    files = {}
    for p in sorted(bundle.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(bundle).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256(p)}
    man["files"] = files
    man["size"] = sum(f["size"] for f in files.values())
    man["size_without_models"] = sum(f["size"] for k, f in files.items() if not k.startswith("models/"))
    (bundle / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
    return man


def check(bundle: Path) -> dict:
    man = json.loads((bundle / MANIFEST).read_text())
    inspect(bundle, man.get("onnxruntime"))
    bad = [rel for rel, f in man["files"].items()
           if not (bundle / rel).is_file() or (bundle / rel).stat().st_size != f["size"] or sha256(bundle / rel) != f["sha256"]]
    if bad:
        raise BundleError("files differ from bundle.json: " + ", ".join(bad[:10]))
    return man


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("bundle", type=Path)
    w.add_argument("--onnxruntime", help="the pinned version that must be bundled")
    w.add_argument("--info", type=Path, action="append", default=[], help="JSON file merged into the manifest")
    c = sub.add_parser("check")
    c.add_argument("bundle", type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "write":
            extra = {}
            for p in a.info:
                extra.update(json.loads(p.read_text()))
            man = write(a.bundle, a.onnxruntime, extra)
        else:
            man = check(a.bundle)
    except BundleError as e:
        print(f"bundle: {e}", file=sys.stderr)
        return 1
    print(f"bundle: {len(man['wheels'])} wheels, {len(man['models'])} model(s), onnxruntime {man['onnxruntime']}, "
          f"{man['size'] / 1e6:.1f} MB ({man['size_without_models'] / 1e6:.1f} MB without models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
