"""Fast checks of build-arm.sh and the bundle manifest logic (no qemu, no downloads).

The real verification (aarch64 bundle under qemu) is `make test-arm`, marked slow below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "arm"))

import bundle  # noqa: E402

SCRIPTS = [ROOT / "build-arm.sh", ROOT / "scripts" / "arm" / "install.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)


def test_help():
    r = subprocess.run([str(ROOT / "build-arm.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "--verify" in r.stdout and "onnxruntime" in r.stdout
    r = subprocess.run(["bash", str(ROOT / "scripts/arm/install.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--state-dir" in r.stdout


def test_unknown_option_fails():
    r = subprocess.run([str(ROOT / "build-arm.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown option" in r.stderr


def test_onnxruntime_pin_is_not_a_sigill_version():
    text = (ROOT / "build-arm.sh").read_text()
    pin = next(l for l in text.splitlines() if l.startswith("ORT_VERSION=")).split(":-")[1].rstrip("}")
    major, minor = (int(x) for x in pin.split(".")[:2])
    assert (major, minor) != (1, 21), "1.21 dies with SIGILL at import on the Pi 4 (docs/arm.md)"
    assert pin in (ROOT / "docs" / "arm.md").read_text()


ORT = "1.27.0"
GOOD_WHEELS = [
    "edged-0.1.0-py3-none-any.whl",
    f"onnxruntime-{ORT}-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
    "tokenizers-0.23.3-cp310-abi3-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
    "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
    "pyyaml-6.0.4-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl",
    "jinja2-3.1.6-py3-none-any.whl",
    "markupsafe-3.0.4-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl",
    "paho_mqtt-2.2.0-py3-none-any.whl",
    "protobuf-7.36.2-cp310-abi3-manylinux2014_aarch64.whl",
]


def make_bundle(tmp_path: Path, wheels=GOOD_WHEELS, target="arm64") -> Path:
    b = tmp_path / "bundle"
    (b / "wheels").mkdir(parents=True)
    for w in wheels:
        (b / "wheels" / w).write_bytes(b"PK" + w.encode())
    m = b / "models" / "tiny"
    m.mkdir(parents=True)
    (m / "model.onnx").write_bytes(b"onnx")
    man = {"target": target, "quantization": {"scheme": "int8-dynamic"}, "gate": {"status": "deferred"},
           "files": {"model.onnx": {"size": 4, "sha256": "x"}}}
    (m / "edged-model.json").write_text(json.dumps(man))
    (b / "install.sh").write_text("#!/bin/sh\n")
    return b


def test_manifest_written_and_checked(tmp_path):
    b = make_bundle(tmp_path)
    man = bundle.write(b, ORT, {"onnxruntime_pin": ORT})
    assert man["onnxruntime"] == ORT
    assert man["models"] == [{"name": "tiny", "scheme": "int8-dynamic", "target": "arm64", "gate": "deferred", "size": 4}]
    assert set(man["wheels"]) >= bundle.REQUIRED
    assert f"onnxruntime=={ORT}\n" in (b / "constraints.txt").read_text()
    assert "install.sh" in man["files"] and "constraints.txt" in man["files"]
    assert man["size_without_models"] < man["size"]
    assert bundle.check(b)["onnxruntime"] == ORT
    (b / "install.sh").write_text("tampered")
    with pytest.raises(bundle.BundleError, match="install.sh"):
        bundle.check(b)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w + ["torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl"], "conversion tooling"),
        (lambda w: [x for x in w if not x.startswith("tokenizers")], "missing wheel: tokenizers"),
        (lambda w: [x.replace("manylinux_2_27_aarch64.manylinux_2_28_aarch64", "manylinux_2_28_x86_64") for x in w], "not installable"),
        (lambda w: w + ["numpy-2.0.0-cp311-cp311-manylinux_2_28_aarch64.whl"], "two versions of numpy"),
        (lambda w: [x.replace("cp311-cp311", "cp312-cp312") if x.startswith("numpy") else x for x in w], "not for CPython 3.11"),
        (lambda w: [x.replace("manylinux_2_27_aarch64.manylinux_2_28_aarch64", "manylinux_2_39_aarch64") if x.startswith("numpy") else x for x in w], "glibc"),
    ],
)
def test_bad_bundles_refused(tmp_path, change, message):
    b = make_bundle(tmp_path, wheels=change(list(GOOD_WHEELS)))
    with pytest.raises(bundle.BundleError, match=message):
        bundle.write(b, ORT, {})


def test_wrong_pin_and_x86_model_refused(tmp_path):
    b = make_bundle(tmp_path)
    with pytest.raises(bundle.BundleError, match="pin is 1.21.0"):
        bundle.write(b, "1.21.0", {})
    b2 = make_bundle(tmp_path / "x", target="x86")
    with pytest.raises(bundle.BundleError, match="not arm64"):
        bundle.write(b2, ORT, {})


def test_wheel_names():
    w = bundle.parse_wheel("paho_mqtt-2.2.0-py3-none-any.whl")
    assert (w["name"], w["version"]) == ("paho-mqtt", "2.2.0")
    assert bundle.platform_ok(["manylinux2014_aarch64"]) and not bundle.platform_ok(["linux_aarch64"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EDGED_TEST_ARM"), reason="qemu verification takes minutes: make test-arm")
def test_build_and_verify_under_qemu():
    subprocess.run([str(ROOT / "build-arm.sh"), "--verify"], check=True, timeout=3600)
