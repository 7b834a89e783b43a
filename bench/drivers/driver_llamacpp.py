"""llama.cpp driver (llama-cpp-python, in .cache/bench/venv-llamacpp).

    python driver_llamacpp.py SPEC.json              measure (protocol in _driver_common)
    python driver_llamacpp.py --quantize IN OUT [TYPE]   requantize a GGUF (TYPE Q8_0, the default,
                                                         or Q4_0) with llama.cpp's API
    python driver_llamacpp.py --version              JSON: llama-cpp-python version + system info
"""

from __future__ import annotations

import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def quantize(src: str, dst: str, kind: str = "Q8_0") -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")
    os.replace(tmp, dst)


def version() -> dict:
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": info.decode() if isinstance(info, bytes) else str(info)}


def main() -> None:
    import _prefix
    from _driver_common import concurrency, emit, load_spec, measure_prompts, peak_rss_bytes, rss_now_bytes

    spec = load_spec()
    import _lookup
    import llama_cpp

    if spec.get("lookup_only"):  # python -m bench.lookup
        emit({"event": "ready"})
        emit({"event": "result", "engine": spec.get("engine", "llamacpp"), "lookup": _lookup.llamacpp(spec["model"], spec)})
        return
    longest = max([len(p["ids"]) for p in spec["prompts"]]
                  + [len(q["ids"]) for k, q in (spec.get("prefix") or {}).items() if k in ("a", "b", "x")])
    n_ctx = longest + max(spec["n_gen"], spec.get("conc_n_gen", 0)) + 16
    llm = llama_cpp.Llama(model_path=spec["model"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=n_ctx, n_batch=512, n_gpu_layers=0, verbose=False)
    emit({"event": "ready"})
    rss_loaded = rss_now_bytes()

    def stream(ids, n):
        def start():
            llm.reset()  # no prefix reuse between runs: every prompt is prefilled
            k = 0
            for _tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
                k += 1
                yield k  # EOS is ignored: exactly n tokens
                if k >= n:
                    break
        return start

    results = measure_prompts(stream, spec)
    peak_single = peak_rss_bytes()  # loaded + single requests done, before concurrency
    conc = []
    lock = threading.Lock()  # one llama context: not thread-safe
    for c in spec.get("concurrency", []):
        def one():
            return sum(1 for _ in stream(spec["prompts"][0]["ids"], spec["conc_n_gen"])())
        conc.append(concurrency(one, c, lock=lock))
    peak_all = peak_rss_bytes()  # before the prefix runs, whose RAM cache holds saved states
    prefix = None
    if _prefix.wanted(spec, spec.get("engine", "llamacpp")):
        prefix = _prefix.measure(prefix_runner(llm), spec)
    lookup = _lookup.llamacpp(spec["model"], spec) if _lookup.wanted(spec, spec.get("engine", "llamacpp")) else None
    emit({"event": "result", "engine": spec.get("engine", "llamacpp"), "lookup": lookup, "prefix": prefix,
          "prompts": results, "concurrency": conc,
          "rss_loaded_bytes": rss_loaded, "peak_rss_single_bytes": peak_single, "peak_rss_bytes": peak_all,
          # tied embeddings: token_embd is also the output matrix, so the whole file is read per token
          "weight_bytes": os.path.getsize(spec["model"]), "weight_bytes_per_token": os.path.getsize(spec["model"]),
          **version()})


def prefix_runner(llm):
    """For _prefix.measure: llama.cpp with its own prompt cache (LlamaRAMCache, set with
    llm.set_cache) or without any. create_completion is the API that uses the cache:
    it continues from the prefix the context already holds, or restores the cached
    state with the longest common prefix when that is longer, and saves the state
    after each completion. TTFT = call -> first streamed chunk."""
    import time

    import llama_cpp

    def make(cached):
        llm.reset()
        llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=256 << 20) if cached else None)

        def run(prompt, n):
            t0 = time.perf_counter()
            ttft = None
            for _chunk in llm.create_completion(prompt["ids"], max_tokens=n, temperature=0.0, top_k=1, top_p=1.0,
                                                min_p=0.0, repeat_penalty=1.0, stream=True):
                if ttft is None:
                    ttft = time.perf_counter() - t0
            return ttft, {}
        return run
    return make


if __name__ == "__main__":
    if sys.argv[1:2] == ["--quantize"]:
        quantize(sys.argv[2], sys.argv[3], *sys.argv[4:5])
    elif sys.argv[1:2] == ["--version"]:
        print(json.dumps(version()))
    else:
        main()
