"""The benchmark: edged side by side with llama.cpp and onnxruntime-genai on the same weights.

Run from the repository root: `python -m bench` (`make bench` pulls the model first).
It lives beside the runtime package, not in it: nothing under edged/ imports it, and
the Pi bundle (an edged wheel) does not carry it.

- `bench.harness`: set-up (prompts, anchors, bandwidth probe), alternating rounds of
  driver processes, the summary that becomes bench/results.json.
- `bench.anchors`: llama.cpp and onnxruntime-genai in their own venvs under .cache/bench.
- `bench.report`: medians, paired ratios, docs/benchmarks.md and the plot.
- `bench.transport`: transport overhead of an in-process daemon (socket and MQTT).
- `bench/drivers/`: what runs in other processes and venvs (one driver per engine,
  the set-up scripts of the anchors, the plot, the memory-bandwidth reader).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout this folder belongs to
DRIVERS = Path(__file__).resolve().parent / "drivers"


def cache_dir() -> Path:
    """Anchor venvs, converted models and logs (gitignored)."""
    return Path(os.environ.get("EDGED_BENCH_CACHE", ROOT / ".cache" / "bench"))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
