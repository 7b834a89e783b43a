"""Plot bench/results.json: tokens/s vs prompt length and vs concurrent clients.
Runs where matplotlib is (the onnxruntime-genai venv), never in edged's runtime.

    python plot.py bench/results.json docs/bench-tokens.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"edged": "edged (int8 ONNX)", "edged_int4": "edged (int4-block32)", "llamacpp": "llama.cpp Q8_0",
          "llamacpp_q4_1": "llama.cpp Q4_1", "llamacpp_q4_0": "llama.cpp Q4_0", "ortgenai": "onnxruntime-genai int8"}
STYLE = {"edged": ("tab:blue", "o"), "edged_int4": ("tab:purple", "D"), "llamacpp": ("tab:orange", "s"),
         "llamacpp_q4_1": ("tab:red", "v"), "llamacpp_q4_0": ("tab:brown", "<"), "ortgenai": ("tab:green", "^")}


def main(src: str, dst: str) -> None:
    res = json.load(open(src))
    s = res.get("summary", {})
    pt = res.get("config", {}).get("prompt_tokens", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = sorted(pt, key=lambda n: pt[n])
    for eng in STYLE:
        e = s.get(eng)
        if not e:
            continue
        color, marker = STYLE[eng]
        xs = [pt[n] for n in names if n in e["prompts"]]
        axes[0].plot(xs, [e["prompts"][n]["decode_tps"] for n in names if n in e["prompts"]],
                     marker=marker, color=color, label=LABELS[eng])
        axes[1].plot(xs, [e["prompts"][n]["prefill_tps"] for n in names if n in e["prompts"]],
                     marker=marker, color=color, label=LABELS[eng])
        cs = sorted(e.get("concurrency", {}), key=int)
        axes[2].plot([int(c) for c in cs], [e["concurrency"][c]["aggregate_tps"] for c in cs],
                     marker=marker, color=color, label=LABELS[eng])
    axes[0].set(title="decode tokens/s vs prompt length", xlabel="prompt tokens", ylabel="tokens/s")
    axes[1].set(title="prefill tokens/s vs prompt length", xlabel="prompt tokens", ylabel="tokens/s")
    axes[2].set(title="aggregate decode tokens/s vs clients", xlabel="concurrent clients", ylabel="tokens/s")
    axes[2].set_xticks([1, 2, 3, 4])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    m = res.get("machine", {})
    fig.suptitle(f"SmolLM2-135M, {res.get('config', {}).get('threads')} threads, {m.get('cpu_model', '')}, "
                 f"{res.get('date', '')[:10]} (medians of {res.get('config', {}).get('rounds')} rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
