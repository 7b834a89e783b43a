#!/usr/bin/env python3
"""Where does a decode step's time go? onnxruntime's profiler over N greedy steps.

    python scripts/profile_decode.py MODEL_DIR_OR_ONNX [--optimum] [--steps 64] [--threads 2]

MODEL_DIR_OR_ONNX is an edged model folder (or its model.onnx). --optimum profiles an
optimum `text-generation-with-past` export instead (inputs input_ids, attention_mask,
position_ids, past_key_values.*; outputs logits, present.*), for the before/after
comparison in docs/profile.md. Prints one line per op type: time per decode step and share.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--optimum", action="store_true")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    path = Path(a.model)
    if path.is_dir():
        path = path / "model.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "edged-profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    kv = [n for n in ins if n.startswith("past_key_values.")]
    shape = ins[kv[0]].shape
    heads, dim = shape[1], shape[3]
    prompt = list(range(100, 140))
    past = {n: np.zeros((1, heads, 0, dim), np.float32) for n in kv}
    ids = prompt
    total = 0
    table = None
    if "inputs_embeds" in ins:  # converter 3+: the engine reads the embedding from its own table
        from edged.engine.embedding import FILENAME, EmbeddingTable

        table = EmbeddingTable(path.parent / FILENAME)
    for _ in range(a.steps + 1):
        total += len(ids)
        tokens = {"inputs_embeds": table.rows([ids])} if table else {"input_ids": np.array([ids], np.int64)}
        feed = {**tokens, "attention_mask": np.ones((1, total), np.int64), **past}
        if "position_ids" in ins:
            feed["position_ids"] = np.arange(total - len(ids), total, dtype=np.int64)[None]
        outs = sess.run(None, feed)
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, outs))
        past = {n: res[n.replace("past_key_values", "present")] for n in kv}
        ids = [int(res["logits"][0, -1].argmax())]
    prof = sess.end_profiling()
    events = json.load(open(prof))
    os.remove(prof)
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    per_op = collections.Counter()
    # skip the prefill run: attribute kernel events to runs by order
    run_idx, seen_first = -1, False
    for e in events:
        if e.get("cat") == "Session" and e["name"] == "model_run":
            run_idx += 1
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and run_idx != 0:
            per_op[e["args"]["op_name"]] += e["dur"]
    steps = len(runs) - 1
    nodes = len({e["name"] for e in events if e.get("cat") == "Node"})
    total_us = sum(per_op.values())
    print(f"model {path}  decode steps {steps}  median step {np.median(runs[1:]) / 1000:.2f} ms  "
          f"kernels/step {sum(1 for e in events if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time')) // len(runs)}")
    for op, us in per_op.most_common(12):
        print(f"  {op:36s} {us / steps / 1000:7.3f} ms/step  {100 * us / total_us:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
