"""Resident memory the daemon does not need: code that only ran while loading, and the
modules of transports that are switched off."""

from __future__ import annotations

import os
import subprocess
import sys



def _resident_bytes(name_part: str) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                inside = len(parts) == 6 and name_part in parts[5]
            elif inside and parts[:1] == ["Rss:"]:
                total += int(parts[1]) * 1024
    return total


def test_onnxruntime_code_run_only_while_loading_is_dropped_after_the_load(smollm2_store):
    # A fresh process, as the daemon is: in the test process other tests have already run
    # (and so paged in) much more of onnxruntime than one load and one request do.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edged.engine.request import GenerateRequest\n"
        "from edged.models.loading import load_engine\n"
        "from edged.models.store import ModelStore\n"
        "from tests.test_footprint import _resident_bytes\n"
        "engine = load_engine('smollm2-135m', store=ModelStore(Path(sys.argv[1])))\n"
        "loaded = _resident_bytes('onnxruntime_pybind11_state')\n"
        "text = engine.generate(GenerateRequest.from_dict({'prompt': 'What is the capital of France?', "
        "'options': {'temperature': 0, 'num_predict': 12}})).run()\n"
        "print(repr(text), loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_store.root)], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    text, loaded = out.stdout.strip().rsplit(" ", 1)
    # Kept mapped, onnxruntime's library is ~21 MiB resident after a load (1-6 MiB released).
    assert int(loaded) < 8 << 20
    assert "Paris" in text  # code dropped at load and needed again came back
    # Not asserted: how much a request maps back. That is the kernel's choice: from a page
    # cache of 4 KiB pages a SmolLM2 request brought back ~9 MiB of the library; from one
    # that holds the freshly installed library in large folios (ext4, Linux 6.18, a clean
    # checkout's .venv) each fault mapped a whole folio, ~25 MiB (docs/profile.md).


def test_a_transport_that_is_off_is_not_imported():
    code = (
        "import sys\n"
        "from types import SimpleNamespace\n"
        "from edged.serve.config import from_dict\n"
        "from edged.transports import enabled_transports\n"
        "cfg = from_dict({'socket': {'enabled': False}, 'mqtt': {'enabled': False}})\n"
        "assert enabled_transports(SimpleNamespace(config=cfg)) == []\n"
        "print(sorted(m for m in sys.modules if m.startswith(('paho', 'sqlite3', 'edged.transports.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EDGED_HOME": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
