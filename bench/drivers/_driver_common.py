"""Shared by the driver scripts (each runs in its own interpreter / venv).

Protocol: the driver gets a JSON spec as argv[1] (a file path), prints one JSON line
{"event": "ready"} on stdout as soon as the model is loaded (the parent times process
start -> that line as cold start), then one line {"event": "result", ...}.

spec: {"model": path, "threads": 2, "n_gen": 128, "prompts": [{"name", "ids", "text"}],
       "concurrency": [1, 4], "conc_n_gen": 64, "warmup": true}
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time


def load_spec() -> dict:
    with open(sys.argv[1]) as f:
        return json.load(f)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure_stream(start_fn, n_prompt: int) -> dict:
    """start_fn() returns an iterator that yields once per generated token.
    TTFT = call -> first token; decode tok/s over the tokens after the first."""
    t0 = time.perf_counter()
    times = []
    for _ in start_fn():
        times.append(time.perf_counter())
    n = len(times)
    ttft = times[0] - t0 if n else float("nan")
    dec = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else float("nan")
    return {
        "prompt_tokens": n_prompt,
        "gen_tokens": n,
        "ttft_s": ttft,
        "prefill_tps": n_prompt / ttft if n else float("nan"),
        "decode_tps": dec,
        "total_s": (times[-1] - t0) if n else float("nan"),
    }


def warmup_tokens(spec: dict) -> int:
    """Tokens the warm-up generates: as many as a measured run. Why not a few: with an
    8-token warm-up edged's first measured prompt decoded at 0.91-0.96x its later runs
    (KV-cache pages and code first touched while being timed), which made
    onnxruntime-genai look ~10 % faster on the short prompt measured first."""
    return int(spec.get("warmup_tokens", spec["n_gen"]))


def measure_prompts(stream, spec: dict) -> dict:
    """Warm up, then measure every prompt of the spec. stream(ids, n) returns a start
    function for measure_stream (ids: the prompt's token ids, n: tokens to generate)."""
    if spec.get("warmup", True):
        for _ in stream(spec["prompts"][0]["ids"], warmup_tokens(spec))():
            pass
    return {p["name"]: measure_stream(stream(p["ids"], spec["n_gen"]), len(p["ids"])) for p in spec["prompts"]}


def concurrency(run_one, clients: int, lock: threading.Lock | None = None, mode: str | None = None) -> dict:
    """`clients` threads each run one generation (run_one() -> tokens generated);
    aggregate tokens/s = all tokens / wall time. With `lock` (engines whose API is not
    thread-safe) the requests run one after another on this thread instead. Why not
    threads taking the lock: llama.cpp's OpenMP pool belongs to the thread that ran it
    first; called from another thread it starts a second pool while the first one still
    spins, which halved its tokens/s here (80 -> 40 tok/s on SmolLM2, 2 threads)."""
    counts = [0] * clients
    errors: list[str] = []

    def one(i):
        try:
            if lock is None:
                counts[i] = run_one()
            else:
                with lock:
                    counts[i] = run_one()
        except Exception as e:  # pragma: no cover - reported, not raised
            errors.append(repr(e))

    t0 = time.perf_counter()
    if lock is not None:
        for i in range(clients):
            one(i)
    else:
        ths = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    wall = time.perf_counter() - t0
    out = {"clients": clients, "tokens": sum(counts), "wall_s": wall,
           "aggregate_tps": sum(counts) / wall if wall > 0 else float("nan"),
           "mode": mode or ("serialised" if lock is not None else "concurrent")}
    if errors:
        out["errors"] = errors[:3]
    return out


def onnx_matmul_weight_bytes(model_path: str) -> int | None:
    """Bytes of the initializers the MatMul-like nodes read (weights, scales, zero points):
    what one decode step streams from memory. A Gather-only embedding table (one row per
    token) is not counted. None if onnx is not importable."""
    try:
        import onnx
    except ImportError:
        return None
    m = onnx.load(model_path, load_external_data=False)
    sizes = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            sizes[t.name] = int(ext["length"])
        else:
            sizes[t.name] = len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    used = set()
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm",
                         "MatMulIntegerToFloat", "QGemm"):
            used.update(i for i in n.input[1:] if i in sizes)
    return sum(sizes[i] for i in used)
