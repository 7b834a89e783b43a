"""Ask the bundle's engine one question on the arm64 model (runs under qemu-aarch64).

usage: python ask.py MODEL_DIR [--prompt TEXT] [--expect WORD] [--num-predict N] [--threads N]
Prints one JSON line: answer, timings, onnxruntime version, platform; exit 1 if WORD is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--expect", default="Paris")
    ap.add_argument("--num-predict", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graph-optimization", default="all", help="disabled | basic | extended | all")
    a = ap.parse_args()

    t0 = time.perf_counter()
    import onnxruntime as ort

    from edged.models.loading import load_engine
    from edged.engine.request import GenerateRequest
    from edged.engine.runner import EngineConfig

    t_import = time.perf_counter() - t0
    engine = load_engine(a.model_dir, config=EngineConfig(threads=a.threads, verify="none", graph_optimization=a.graph_optimization))
    t_load = time.perf_counter() - t0 - t_import
    req = GenerateRequest.from_dict(
        {"prompt": a.prompt, "options": {"temperature": 0, "num_predict": a.num_predict}}, max_prompt_chars=None
    )
    t1 = time.perf_counter()
    gen = engine.generate(req)
    text = "".join(gen)
    t_gen = time.perf_counter() - t1
    s = gen.stats or {}
    ok = a.expect.lower() in text.lower()
    print(json.dumps({
        "ok": ok,
        "answer": text,
        "expect": a.expect,
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
        "quantization": engine.describe().get("quantization"),
        "graph_optimization": a.graph_optimization,
        "import_s": round(t_import, 1),
        "load_s": round(t_load, 1),
        "generate_s": round(t_gen, 1),
        "prompt_tokens": s.get("prompt_eval_count"),
        "eval_count": s.get("eval_count"),
        "done_reason": s.get("done_reason"),
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
