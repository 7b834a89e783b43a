"""onnxruntime-genai driver (in .cache/bench/venv-ortgenai).

    python driver_ortgenai.py SPEC.json      measure (protocol in _driver_common)
    python driver_ortgenai.py --version      JSON: versions
Threads come from genai_config.json (bench/anchors.py writes intra_op_num_threads there).
"""

from __future__ import annotations

import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def version() -> dict:
    import onnxruntime_genai as og

    out = {"onnxruntime_genai": og.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def main() -> None:
    from _driver_common import (concurrency, emit, load_spec, measure_prompts, onnx_matmul_weight_bytes,
                                peak_rss_bytes, rss_now_bytes)

    spec = load_spec()
    import onnxruntime_genai as og

    model = og.Model(spec["model"])
    emit({"event": "ready"})
    rss_loaded = rss_now_bytes()

    def stream(ids, n):
        def start():
            params = og.GeneratorParams(model)
            total = len(ids) + n
            try:  # min_length keeps EOS from ending early
                params.set_search_options(max_length=total, min_length=total, do_sample=False)
            except Exception:
                params.set_search_options(max_length=total, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens(ids)  # prefill
            k = 0
            while k < n and not gen.is_done():
                gen.generate_next_token()
                k += 1
                yield k
        return start

    results = measure_prompts(stream, spec)
    peak_single = peak_rss_bytes()  # loaded + single requests done, before concurrency
    conc = []
    for c in spec.get("concurrency", []):
        def one():
            return sum(1 for _ in stream(spec["prompts"][0]["ids"], spec["conc_n_gen"])())
        # one generator per client on the shared model: genai allows that; if it fails,
        # fall back to serialised like the others
        r = concurrency(one, c)
        if r.get("errors"):
            r = concurrency(one, c, lock=threading.Lock())
        conc.append(r)
    weight = sum(os.path.getsize(os.path.join(spec["model"], f)) for f in os.listdir(spec["model"])
                 if f.endswith((".onnx", ".onnx.data", ".data")))
    emit({"event": "result", "engine": "ortgenai", "prompts": results, "concurrency": conc,
          "rss_loaded_bytes": rss_loaded, "peak_rss_single_bytes": peak_single, "peak_rss_bytes": peak_rss_bytes(),
          "weight_bytes": weight,
          "weight_bytes_per_token": onnx_matmul_weight_bytes(os.path.join(spec["model"], "model.onnx")), **version()})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--version"]:
        print(json.dumps(version()))
    else:
        main()
