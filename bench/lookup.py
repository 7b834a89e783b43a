"""Prompt-lookup speculative decoding: edged with and without it, and llama.cpp Q8_0
plain and with its own prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding
draft model), on input-grounded tasks about a ~300-token sensor log (extract fields,
summarise, reformat as JSON) and on open-ended prompts, in the same rounds.

The drivers measure (bench/drivers/_lookup.py); this module builds the prompts for
the spec, derives the ratios and writes the report's section. `python -m bench.lookup`
runs only this measurement (edged and llama.cpp, alternating rounds) and merges it
into an existing results file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.report import fmt, median, ratio

ENGINES = ("edged", "llamacpp")  # the drivers that run it
HEADLINE = ("lookup_decode_ratio_vs_llamacpp_q8_0", "lookup_decode_ratio_vs_llamacpp_lookup", "lookup_open_ended_ratio")
GOALS = {"lookup_decode_ratio_vs_llamacpp_q8_0": 1.6, "lookup_decode_ratio_vs_llamacpp_lookup": 1.2,
         "lookup_open_ended_ratio": 0.97}
N_GEN = 192  # most tokens per answer; answers end at EOS like a user's would
LOG_TARGET = 300  # tokens of the sensor log
NUM_PRED_TOKENS = (2, 10)  # llama.cpp's draft lengths: its README's advice for CPU-only, and its default

_SENSORS = ("greenhouse-1", "greenhouse-2", "shed", "cold-frame")


def sensor_log(encode, target: int = LOG_TARGET) -> str:
    """The first lines of a deterministic sensor log that reach `target` tokens."""
    lines, i = [], 0
    while not lines or len(encode("\n".join(lines))) < target:
        s = _SENSORS[i % len(_SENSORS)]
        temp = 14.0 + (i * 37 % 90) / 10
        lines.append(f"06:{i * 5 % 60:02d} {s} temp={temp:.1f}C humidity={48 + i * 7 % 40}% "
                     f"soil={20 + i * 11 % 60} door={'open' if i % 3 == 1 else 'closed'}")
        i += 1
    return "\n".join(lines)


def _as_json(line: str) -> str:
    t, sensor, temp, hum, soil, door = line.split()
    return json.dumps({"time": t, "sensor": sensor, "temp": float(temp[5:-1]), "humidity": int(hum[9:-1]),
                       "soil": int(soil[5:]), "door": door[5:]})


def tasks(log: str) -> list[tuple[str, str, str]]:
    """(name, kind, user message): the grounded tasks, then the open-ended prompts. The
    JSON task shows the first two lines converted: SmolLM2-135M asked without an example
    nests objects of its own instead of converting the lines."""
    example = ",\n".join(_as_json(line) for line in log.splitlines()[:2])
    return [
        ("extract", "grounded", f"Sensor log:\n{log}\n\nExtract the lines of greenhouse-2 from the log."),
        ("summarise", "grounded", f"Sensor log:\n{log}\n\nSummarise the log."),
        ("json", "grounded", f"Sensor log:\n{log}\n\nReformat the log as JSON, one object per line. The first two "
                             f"lines become:\n[{example},\n...]\nWrite the whole array."),
        ("story", "open", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
        ("explain", "open", "Explain to a ten-year-old why the sky is blue and sunsets are red."),
        ("advice", "open", "Give me five tips for growing tomatoes on a balcony, with a sentence on each."),
    ]


def build(encode, render, eos: list[int], *, n_gen: int = N_GEN, context: int = 2048,
          log_target: int = LOG_TARGET) -> dict:
    """spec["lookup"] for the drivers. encode(text) -> ids without special tokens;
    render(user message) -> the chat-templated prompt text; eos: the ids that end an
    answer. A task whose prompt and answer would not fit in `context` is left out
    (listed under "skipped")."""
    log = sensor_log(encode, log_target)
    out, skipped = [], []
    for name, kind, message in tasks(log):
        text = render(message)
        ids = list(encode(text))
        if len(ids) + n_gen > context:
            skipped.append(name)
            continue
        out.append({"name": name, "kind": kind, "text": text, "ids": ids})
    return {"tasks": out, "n_gen": n_gen, "eos": sorted(set(eos)), "engines": list(ENGINES), "skipped": skipped,
            "num_pred_tokens": list(NUM_PRED_TOKENS), "log_tokens": len(encode(log))}


def _runs(results: dict) -> dict[str, list[dict]]:
    """Per engine, the rounds' lookup measurements: from the main runs when they have
    them, else from a `python -m bench.lookup` run (results["lookup_runs"])."""
    main = results.get("runs") or {}
    if any((r.get("lookup") or {}).get("tasks") for rs in main.values() for r in rs if "error" not in r):
        src = main
    else:
        src = results.get("lookup_runs") or {}
    return {eng: [r.get("lookup") if "error" not in r else None for r in src.get(eng) or []] for eng in ENGINES}


def _rate(run: dict | None, kind: str, mode: str) -> float | None:
    """Decode tok/s over all tasks of a kind in one round: generated tokens after the
    first / time from the first to the last token, summed over the tasks."""
    if not run:
        return None
    tokens = seconds = 0.0
    for t in run.get("tasks", {}).values():
        m = t.get(mode)
        if t.get("kind") != kind or not m or not m.get("decode_s"):
            if t.get("kind") == kind:
                return None
            continue
        tokens += m["gen_tokens"] - 1
        seconds += m["decode_s"]
    return tokens / seconds if seconds else None


def derive(results: dict) -> None:
    """results["lookup"]: rates per engine and mode, the ratios (paired by round), and
    the headline ratios at the top level."""
    runs = _runs(results)
    e, lc = runs["edged"], runs["llamacpp"]
    if not any(e):
        return
    modes = {"edged": ("on", "off"), "llamacpp": ("plain",) + tuple(f"lookup_{k}" for k in NUM_PRED_TOKENS)}
    rates = {eng: {kind: {m: median(_rate(r, kind, m) for r in runs[eng]) for m in modes[eng]}
                   for kind in ("grounded", "open")} for eng in ENGINES}
    # llama.cpp's lookup at its better draft length on this machine (median over rounds)
    best = max((f"lookup_{k}" for k in NUM_PRED_TOKENS), key=lambda m: rates["llamacpp"]["grounded"].get(m) or 0)

    def paired(mode_e, kind, mode_l):
        return median(ratio(_rate(x, kind, mode_e), _rate(y, kind, mode_l)) for x, y in zip(e, lc))

    r = {
        "lookup_decode_ratio_vs_llamacpp_q8_0": paired("on", "grounded", "plain"),
        "lookup_decode_ratio_vs_llamacpp_lookup": paired("on", "grounded", best),
        "lookup_open_ended_ratio": median(ratio(_rate(x, "open", "on"), _rate(x, "open", "off")) for x in e),
        "lookup_grounded_speedup": median(ratio(_rate(x, "grounded", "on"), _rate(x, "grounded", "off")) for x in e),
        "plain_grounded_ratio_vs_llamacpp_q8_0": paired("off", "grounded", "plain"),
        "llamacpp_lookup_speedup": median(ratio(_rate(y, "grounded", best), _rate(y, "grounded", "plain")) for y in lc),
        "llamacpp_lookup_mode": best,
        "open_ratio_vs_llamacpp_q8_0": paired("on", "open", "plain"),
    }
    per_task: dict = {}
    for eng in ENGINES:
        for run in runs[eng]:
            for name, t in ((run or {}).get("tasks") or {}).items():
                for m in modes[eng]:
                    if (t.get(m) or {}).get("decode_s"):
                        per_task.setdefault(name, {"kind": t.get("kind")}).setdefault(f"{eng}_{m}", []).append(t[m])
    for name, v in per_task.items():
        for k, ms in list(v.items()):
            if k == "kind":
                continue
            v[k] = {"decode_tps": median((m["gen_tokens"] - 1) / m["decode_s"] for m in ms),
                    "gen_tokens": median(m["gen_tokens"] for m in ms)}
            acc = [m for m in ms if m.get("draft_tokens") is not None]
            if acc:
                v[k]["draft_tokens"] = median(m["draft_tokens"] for m in acc)
                v[k]["accepted_tokens"] = median(m["accepted_tokens"] for m in acc)
    prev = results.get("lookup") or {}
    results["lookup"] = {"rates": rates, "ratios": r, "tasks": per_task,
                         "rounds": sum(1 for x, y in zip(e, lc) if x and y) or sum(1 for x in e if x)}
    for k in ("measured", "note"):  # written by hand next to a standalone run's figures
        if k in prev:
            results["lookup"][k] = prev[k]
    for k in HEADLINE:
        results[k] = r.get(k)


def markdown(results: dict) -> list[str]:
    lk = results.get("lookup")
    if not lk:
        return []
    r, tasks_ = lk.get("ratios") or {}, lk.get("tasks") or {}
    best = r.get("llamacpp_lookup_mode") or "lookup_10"
    lines = ["", "## Prompt-lookup speculative decoding", "",
             f"Answers (greedy, chat template, up to {N_GEN} tokens, ending at EOS) about a ~{LOG_TARGET}-token sensor "
             "log (grounded: extract, summarise, JSON) and to open-ended prompts (`bench/lookup.py`). edged drafts "
             "from the prompt and its text so far (engine/lookup.py), with and without; llama.cpp Q8_0 plain and with "
             "llama-cpp-python's `LlamaPromptLookupDecoding` draft model (`num_pred_tokens` "
             + " and ".join(str(k) for k in NUM_PRED_TOKENS) + f"; the faster here, {best.split('_')[1]}, is "
             "compared). Decode tok/s per task, median over rounds:", "",
             "| task | kind | edged lookup | edged plain | drafted / accepted | llama.cpp plain | "
             + " | ".join(f"llama.cpp lookup {k}" for k in NUM_PRED_TOKENS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(NUM_PRED_TOKENS)]
    for name, v in tasks_.items():
        on = v.get("edged_on") or {}
        cells = [name, v.get("kind", ""), fmt(on.get("decode_tps"), 1), fmt((v.get("edged_off") or {}).get("decode_tps"), 1),
                 f"{fmt(on.get('draft_tokens'), 0)} / {fmt(on.get('accepted_tokens'), 0)} of {fmt(on.get('gen_tokens'), 0)}",
                 fmt((v.get("llamacpp_plain") or {}).get("decode_tps"), 1)]
        cells += [fmt((v.get(f"llamacpp_lookup_{k}") or {}).get("decode_tps"), 1) for k in NUM_PRED_TOKENS]
        lines.append("| " + " | ".join(cells) + " |")
    met = []
    for k, bound in GOALS.items():
        v = r.get(k)
        met.append(f"`{k}` {fmt(v, 2)} (goal ≥ {bound}: {'met' if v is not None and v >= bound else 'missed' if v is not None else 'not measured'})")
    lines += ["", "Ratios (median of same-round pairs, decode tok/s summed over the tasks of a kind): " + "; ".join(met)
              + f". edged lookup ÷ edged plain on the grounded tasks: {fmt(r.get('lookup_grounded_speedup'), 2)}; "
              f"llama.cpp's own lookup ÷ its plain decoding: {fmt(r.get('llamacpp_lookup_speedup'), 2)}; edged plain ÷ "
              f"llama.cpp plain on the grounded tasks: {fmt(r.get('plain_grounded_ratio_vs_llamacpp_q8_0'), 2)}."]
    m = lk.get("measured") or {}
    if m:
        loads = [x for x in m.get("machine_load") or [] if x is not None]
        lines += ["", f"Measured apart from the table above by `{m.get('by')}` ({m.get('rounds')} alternating rounds, "
                      f"{m.get('threads')} threads, {m.get('date', '')}; 1-minute load average before the runs "
                      f"{min(loads):.1f}-{max(loads):.1f})." if loads else ""]
    if lk.get("note"):
        lines += ["", lk["note"]]
    return lines


# -- standalone run -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from bench import DRIVERS, anchors, cache_dir, log
    from bench.harness import Plan, machine_info, run_rounds

    p = argparse.ArgumentParser(prog="python -m bench.lookup", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--store", type=Path)
    p.add_argument("--out", default="bench/results.json", help="results file to merge into (default %(default)s)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    from edged.models.store import ModelStore

    store = ModelStore(args.store) if args.store else ModelStore()
    spec = {"threads": args.threads, "n_gen": N_GEN, "prompts": [], "warmup": True, "lookup_only": True,
            "lookup": spec_for(store.get(args.model))}
    cache = cache_dir()
    missing: list[str] = []
    machine = machine_info()
    commands = {"edged": ([sys.executable, str(DRIVERS / "driver_edged.py")],
                          {**spec, "model": args.model, "store": str(store.root)})}
    commands.update(anchors.commands(args.model, {"llamacpp"}, cache=cache, threads=args.threads, spec=spec,
                                     machine=machine, missing=missing))
    plan = Plan(model=args.model, store_root=Path(store.root), threads=args.threads, rounds=args.rounds, n_gen=N_GEN,
                conc_n_gen=0, prompts=[], commands=commands, machine=machine, bandwidth={}, missing=missing)
    runs = run_rounds(plan)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}, "missing": []}
    results["lookup_runs"] = runs
    derive(results)
    if "lookup" in results:
        results["lookup"]["measured"] = {"by": "python -m bench.lookup", "rounds": args.rounds,
                                         "threads": args.threads, "machine_load": [r.get("loadavg_1m_before") for rs in runs.values() for r in rs]}
    from bench.harness import write_outputs

    write_outputs(results, out, None if args.no_docs else Path("docs"), cache)
    log("lookup: " + json.dumps({k: results.get(k) for k in HEADLINE}))
    for m in missing:
        log(f"missing: {m}")
    return 0 if "lookup" in results else 1


def spec_for(model) -> dict:
    """spec["lookup"] from an installed model: its tokenizer, chat template and EOS ids."""
    from tokenizers import Tokenizer

    from edged.engine.template import ChatTemplate

    m = model.manifest
    tok = Tokenizer.from_file(str(model.file("tokenizer")))
    tmpl = m["files_by_role"].get("chat_template")
    template = ChatTemplate((model.path / tmpl).read_text(), bos_token=m.get("bos_token") or "",
                            eos_token=m.get("eos_token") or "") if tmpl else None

    def render(message: str) -> str:
        msgs = [{"role": "user", "content": message}]
        return template.render(msgs, add_generation_prompt=True) if template else message

    # a model with a short context (the tests' tiny one) gets a shorter log and answers
    context = int(m.get("context_length") or 2048)
    n_gen = min(N_GEN, context // 4)
    return build(lambda t: tok.encode(t, add_special_tokens=False).ids, render, list(m["eos_token_ids"]),
                 n_gen=n_gen, context=context, log_target=max(1, min(LOG_TARGET, context - n_gen - 200)))


if __name__ == "__main__":
    sys.exit(main())
