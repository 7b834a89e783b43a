"""`python -m bench`: measure, then write bench/results.json, docs/benchmarks.md and the plot.

Run from the repository root; relative paths (--out, docs/) are taken from there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import anchors, cache_dir
from bench.harness import (CONC_N_GEN, DEFAULT_ROUNDS, N_GEN, add_transport, run_rounds, serve_rss, set_up,
                           summarize_rounds, write_outputs)
from bench.report import HEADLINE, LABELS, fmt, derive

DOCS = Path("docs")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="edged side by side with llama.cpp and onnxruntime-genai on the same "
                                            "weights (run from the repository root)")
    p.add_argument("--model", default="smollm2-135m", help="an installed model (edged pull it first)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="alternating rounds (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default %(default)s)")
    p.add_argument("--no-anchors", action="store_true", help="edged only: no llama.cpp, no onnxruntime-genai")
    p.add_argument("--anchors", default=",".join(anchors.NAMES),
                   help="comma-separated anchors to run (default %(default)s)")
    p.add_argument("--out", default="bench/results.json", help="the results JSON (default %(default)s)")
    p.add_argument("--transport", action="store_true",
                   help="also measure the transport overhead of an in-process daemon (socket and MQTT)")
    p.add_argument("--store", type=Path, help="models folder (default: $EDGED_HOME/models)")
    p.add_argument("--n-gen", type=int, default=N_GEN, help="generated tokens per prompt (default %(default)s)")
    p.add_argument("--no-docs", action="store_true", help="write only the JSON (no docs/benchmarks.md, no plot)")
    p.add_argument("--report-only", action="store_true", help="rebuild the summary, docs and plot from --out's runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    docs = None if args.no_docs else DOCS
    if args.report_only:
        results = derive(json.loads(out.read_text()))
        write_outputs(results, out, docs, cache_dir())
        print(f"rewrote {out}" + ("" if docs is None else f" and {docs / 'benchmarks.md'}") + " from its runs")
        return 0
    wanted = () if args.no_anchors else tuple(a for a in args.anchors.split(",") if a)
    plan = set_up(args.model, threads=args.threads, rounds=args.rounds, anchor_names=wanted,
                  store_root=args.store, n_gen=args.n_gen, conc_n_gen=CONC_N_GEN)
    results = summarize_rounds(plan, run_rounds(plan), serve_rss(plan))
    if args.transport:
        add_transport(results, plan)
    write_outputs(results, out, docs, cache_dir())
    print_summary(results)
    print(f"wrote {out}")
    return 0 if "edged" in results["summary"] else 1


def print_summary(results: dict) -> None:
    s = results["summary"]
    for eng in s:
        p = s[eng]["prompts"]
        print(f"{LABELS[eng]:26s} " + "  ".join(
            f"{n}: ttft {fmt(v.get('ttft_s'), 3)}s decode {fmt(v.get('decode_tps'), 1)} tok/s" for n, v in p.items())
            + f"  cold {fmt(s[eng].get('cold_start_s'), 2)}s rss {fmt(s[eng].get('peak_rss_single_mb'), 0)}"
            f"/{fmt(s[eng].get('peak_rss_mb'), 0)}MB")
    print(json.dumps({k: results.get(k) for k in HEADLINE}))
    for m in results.get("missing", []):
        print(f"missing: {m}")


if __name__ == "__main__":
    sys.exit(main())
