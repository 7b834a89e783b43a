"""The prompt-lookup measurement, shared by the drivers (bench/lookup.py builds the spec
and derives the ratios). Each engine answers every task in each of its modes; the
modes alternate in order from task to task, so drift in the machine's load falls on
both. An answer ends at EOS (spec ids) or after n_gen tokens.

spec["lookup"]: {"tasks": [{"name", "kind": "grounded" | "open", "text", "ids"}],
"n_gen": int, "eos": [ids], "engines": [names that run it], "num_pred_tokens": [k, ...]}.

Result: {"tasks": {name: {"kind", mode: {"gen_tokens", "decode_s", "ttft_s", ...}}}}
with decode_s = last token time - first token time.
"""

from __future__ import annotations

import time


def wanted(spec: dict, engine: str) -> bool:
    lk = spec.get("lookup")
    return bool(lk) and engine in lk.get("engines", ())


def timed(tokens) -> dict:
    """Iterate a token stream; its timing."""
    t0 = time.perf_counter()
    times = [time.perf_counter() for _ in tokens]
    return {"gen_tokens": len(times), "ttft_s": times[0] - t0 if times else None,
            "decode_s": times[-1] - times[0] if len(times) > 1 else None}


def measure(runners: dict, spec: dict, kinds: dict | None = None) -> dict:
    """runners: mode -> run(task, n_gen) -> result dict (timed() + extras).
    kinds: mode -> the task kinds it runs (default: all)."""
    lk = spec["lookup"]
    modes = list(runners)
    out: dict = {"tasks": {}}
    for i, task in enumerate(lk["tasks"]):
        entry = out["tasks"].setdefault(task["name"], {"kind": task["kind"]})
        order = modes[i % len(modes):] + modes[: i % len(modes)]
        for mode in order:
            if kinds and task["kind"] not in kinds.get(mode, (task["kind"],)):
                continue
            entry[mode] = runners[mode](task, lk["n_gen"])
    return out


def edged(engine, spec: dict) -> dict:
    """edged with speculation on and off (engine.speculative), through the engine API."""
    from _edged import request as edged_request
    from _edged import token_counts

    lk = spec["lookup"]
    available = engine.runner.multi_logits and engine.config.lookup  # a graph with num_logits, not turned off
    saved = engine.speculative

    def request(task, n):
        # raw: the task's text is the rendered chat prompt, so the ids are the anchors' ids
        return edged_request(task["text"], n)

    def runner(on: bool):
        def run(task, n):
            engine.speculative = available and on
            try:
                gen = engine.generate(request(task, n))
                r = timed(token_counts(gen))
            finally:
                engine.speculative = saved
            st = gen.stats
            r.update(draft_tokens=st.get("draft_tokens"), accepted_tokens=st.get("accepted_tokens"),
                     done_reason=st.get("done_reason"),
                     ids_match=list(engine.prepare(request(task, 1)).tokens) == list(task["ids"]))
            return r
        return run

    engine.generate(request(lk["tasks"][0], 8)).run()  # warm-up
    out = measure({"on": runner(True), "off": runner(False)}, spec)
    out["speculative_available"] = available
    return out


def llamacpp(model_path: str, spec: dict) -> dict:
    """llama.cpp plain and with LlamaPromptLookupDecoding at each num_pred_tokens, one
    Llama per mode (the draft model is fixed at construction); EOS ends an answer."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    lk = spec["lookup"]
    eos = set(lk["eos"])
    n_ctx = max(len(t["ids"]) for t in lk["tasks"]) + lk["n_gen"] + 32

    def make(draft):
        # logits_all with a draft model: llama-cpp-python turns it on itself then, but sizes its
        # logits buffer from the argument (n_batch rows), which overflows past 512 tokens
        return llama_cpp.Llama(model_path=model_path, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                               n_ctx=n_ctx, n_batch=512, n_gpu_layers=0, verbose=False, draft_model=draft,
                               logits_all=draft is not None)

    def runner(llm):
        def run(task, n):
            def tokens():
                llm.reset()
                k = 0
                for tok in llm.generate(task["ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                        reset=True):
                    if tok in eos:
                        break
                    k += 1
                    yield k
                    if k >= n:
                        break
            return timed(tokens())
        return run

    models = {"plain": make(None)}
    for k in lk.get("num_pred_tokens", [10]):
        models[f"lookup_{k}"] = make(LlamaPromptLookupDecoding(num_pred_tokens=k))
    for llm in models.values():  # warm-up
        for _ in zip(range(8), llm.generate(lk["tasks"][0]["ids"], top_k=1, temp=0.0, reset=True)):
            pass
    runners = {mode: runner(llm) for mode, llm in models.items()}
    # llama.cpp's lookup only where it is compared (grounded); plain on every task
    kinds = {mode: ("grounded",) for mode in models if mode != "plain"}
    return measure(runners, spec, kinds)
