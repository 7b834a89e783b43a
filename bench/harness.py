"""Set-up, alternating rounds and summary of the benchmark.

Every engine runs in its own subprocess (a driver in bench/drivers/, the anchors in
their own venvs under .cache/bench, see bench.anchors), so cold start and peak RSS are
per process. Rounds alternate engines (edged, llama.cpp, genai, edged, ...) on a shared,
noisy machine; the report is medians over rounds and ratios of paired (same-round)
measurements.

    plan = set_up("smollm2-135m", threads=2, rounds=7)
    results = summarize_rounds(plan, run_rounds(plan), serve_rss(plan))
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import DRIVERS, ROOT, anchors, cache_dir, log
from bench import lookup as lookup_bench
from bench import prefix as prefix_bench
from bench.report import derive, markdown_report

# Alternating rounds per run. Why 7: on a shared 2-core machine single rounds vary by
# +-15 % (llama.cpp 62-107 tok/s within one run); a round takes ~25 s.
DEFAULT_ROUNDS = 7
N_GEN = 128  # generated tokens per measured prompt
CONC_N_GEN = 64  # per client in the concurrency runs

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


def build_prompts(encode, short_target: int = SHORT_TARGET, long_target: int = LONG_TARGET) -> list[dict]:
    """Prompts of about short/long_target tokens. `encode(text) -> ids` is the model's
    tokenizer without special tokens; the long prompt is cut on a word boundary."""
    out = []
    for name, base, target in (("short", SHORT_PROMPT, short_target), ("long", _LONG_BASE, long_target)):
        text = prefix_bench.fit(encode, base, target)
        out.append({"name": name, "text": text, "ids": list(encode(text))})
    return out


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


def measure_bandwidth(threads: int, cache: Path, mib: int = 512) -> dict:
    """A tiny C reader compiled at bench time; numpy (one thread per slice) if no compiler."""
    src = DRIVERS / "membw.c"
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


def run_driver(cmd: list[str], spec: dict, *, timeout: float = 900, env: dict | None = None) -> dict:
    """Start a driver process; cold start = process start -> its "ready" line."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, spec_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})}, cwd=str(ROOT))
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


@dataclass
class Plan:
    """What set_up decided: the prompts, each engine's driver command and spec (in round
    order), the machine and its bandwidth; `missing` collects what will not be measured."""

    model: str
    store_root: Path
    threads: int
    rounds: int
    n_gen: int
    conc_n_gen: int
    prompts: list[dict]
    commands: dict[str, tuple[list[str], dict]]
    machine: dict
    bandwidth: dict
    missing: list[str] = field(default_factory=list)


def set_up(model: str, *, threads: int = 2, rounds: int = DEFAULT_ROUNDS, anchor_names=anchors.NAMES,
           store_root: Path | None = None, n_gen: int = N_GEN, conc_n_gen: int = CONC_N_GEN,
           short_tokens: int = SHORT_TARGET, long_tokens: int = LONG_TARGET, bw_mib: int = 512) -> Plan:
    """Prompts from the model's tokenizer, the anchors (none when `anchor_names` is
    empty), and the memory-bandwidth probe."""
    from tokenizers import Tokenizer

    from edged.models.store import ModelStore

    cache = cache_dir()
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    store = ModelStore(store_root) if store_root else ModelStore()
    tok = Tokenizer.from_file(str(store.get(model).file("tokenizer")))
    prompts = build_prompts(lambda t: tok.encode(t, add_special_tokens=False).ids, short_tokens, long_tokens)
    spec = {"threads": threads, "n_gen": n_gen, "prompts": prompts, "concurrency": [1, 4],
            "conc_n_gen": conc_n_gen, "warmup": True}
    # prefix-cache TTFT (bench/prefix.py): a ~300-token shared system prompt, shorter when
    # the model's context could not hold the request
    ctx = int(store.get(model).manifest.get("context_length") or 2048)
    spec["prefix"] = prefix_bench.build(lambda t: tok.encode(t, add_special_tokens=False).ids,
                                        min(prefix_bench.TARGET, ctx // 2 - 40))
    # prompt-lookup speculative decoding (bench/lookup.py): tasks about a sensor log, open-ended prompts
    spec["lookup"] = lookup_bench.spec_for(store.get(model))
    missing: list[str] = []
    machine = machine_info()
    commands = {"edged": ([sys.executable, str(DRIVERS / "driver_edged.py")],
                          {**spec, "model": model, "store": str(store.root)})}
    if anchor_names:
        commands.update(anchors.commands(model, set(anchor_names), cache=cache, threads=threads, spec=spec,
                                         machine=machine, missing=missing))
    else:
        missing.append("anchors skipped (--no-anchors)")
    log(f"memory bandwidth probe ({threads} threads)")
    bandwidth = measure_bandwidth(threads, cache, bw_mib)
    return Plan(model=model, store_root=Path(store.root), threads=threads, rounds=max(1, rounds), n_gen=n_gen,
                conc_n_gen=conc_n_gen, prompts=prompts, commands=commands, machine=machine, bandwidth=bandwidth,
                missing=missing)


def run_rounds(plan: Plan) -> dict[str, list[dict]]:
    """Every engine's driver once per round, engines alternating; engine -> results."""
    runs: dict[str, list[dict]] = {e: [] for e in plan.commands}
    for rnd in range(plan.rounds):
        for eng, (cmd, spec) in plan.commands.items():
            log(f"round {rnd + 1}/{plan.rounds}: {eng}")
            load_before = os.getloadavg()[0]
            r = run_driver(cmd, spec)
            r["round"] = rnd
            r["loadavg_1m_before"] = load_before  # the machine is shared: how busy it was
            if "error" in r:
                log(f"{eng} failed: {r['error'][-300:]}")
            runs[eng].append(r)
    for eng, rs in runs.items():
        if rs and all("error" in r for r in rs):
            plan.missing.append(f"{eng}: every run failed: {rs[-1]['error'][-300:]}")
    return runs


def serve_rss(plan: Plan, timeout: float = 600) -> dict | None:
    """The target's own measure: peak RSS of a real `edged serve` process (Unix socket
    only, MQTT off) with the model loaded and the benchmark's prompts answered, read
    from /proc/PID/status (VmHWM) before it is stopped. None (and a line in
    plan.missing) when the daemon could not be measured."""
    log("edged serve: peak RSS of the daemon process after the same prompts")
    try:
        return _serve_rss(plan, timeout)
    except Exception as e:
        plan.missing.append(f"edged serve RSS: failed: {e!r}")
        return None


def _serve_rss(plan: Plan, timeout: float) -> dict:
    import signal

    from edged.serve.client import SocketClient

    with tempfile.TemporaryDirectory(prefix="edged-bench-serve-") as d:
        sock = os.path.join(d, "s.sock")
        cfg = os.path.join(d, "edged.yaml")
        with open(cfg, "w") as f:
            json.dump({"model": plan.model, "models_dir": str(plan.store_root), "keep_alive": -1,
                       "log_level": "warning", "engine": {"threads": plan.threads},
                       "socket": {"path": sock}, "mqtt": {"enabled": False}}, f)
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
                for p in plan.prompts:
                    final = c.call({"prompt": p["text"], "raw": True, "stream": False, "options": {
                        "temperature": 0, "num_predict": plan.n_gen, "repeat_penalty": 1.0, "top_k": 1}})
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


DEFINITIONS = {
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
}


def summarize_rounds(plan: Plan, runs: dict[str, list[dict]], serve: dict | None) -> dict:
    """The results document (bench/results.json): the raw runs, the set-up, and the
    medians and ratios derived from them."""
    results = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": plan.model,
        "machine": plan.machine,
        "config": {"threads": plan.threads, "rounds": plan.rounds, "n_gen": plan.n_gen,
                   "conc_n_gen": plan.conc_n_gen, "prompt_tokens": {p["name"]: len(p["ids"]) for p in plan.prompts},
                   "greedy": True, "order": list(plan.commands)},
        "definitions": DEFINITIONS,
        "bandwidth": plan.bandwidth,
        "summary": None,  # derived below; placed here to keep the document's order
        "ratios": None,
        "missing": plan.missing,
        "runs": runs,
    }
    if serve is not None:
        results["serve_rss"] = serve
    return derive(results)


def add_transport(results: dict, plan: Plan) -> None:
    """The transport overhead of an in-process daemon, under results["transport"]."""
    from edged.models.store import ModelStore

    from bench.transport import run_transport_bench

    log("transport bench (socket + MQTT, in-process daemon)")
    try:
        results["transport"] = run_transport_bench(ModelStore(plan.store_root), plan.model, threads=plan.threads)
    except Exception as e:
        results["missing"].append(f"transport: failed: {e!r}")


def write_outputs(results: dict, out: Path, docs: Path | None, cache: Path) -> None:
    """The JSON at `out`; with `docs`, benchmarks.md and bench-tokens.png there too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    if docs is None:
        return
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(markdown_report(results))
    py = anchors.venv_python(cache, "ortgenai")  # matplotlib lives in an anchor venv, not in edged's
    if py.is_file():
        r = subprocess.run([str(py), str(DRIVERS / "plot.py"), str(out), str(docs / "bench-tokens.png")],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            log(f"plot failed: {r.stderr.strip()[-300:]}")
    else:
        log("no plot: matplotlib's venv (.cache/bench/venv-ortgenai) is not set up")
