"""The quality gate for arm64 models, split across two machines.

The gate of edged/models/gate.py (perplexity ratio int8/fp32 on GATE_TEXT, and
teacher-forced top-1 agreement with fp32's greedy continuation of the chat prompts;
fail when ratio > 1.10 or agreement < 0.80), with:

  * the fp32 side computed once on x86 (`reference`): fp32 kernels are not the
    ISA-sensitive part, the int8 u8s8 kernels are. Cached in .cache/arm/reference/,
    keyed by the model source's sha256 and the sizes.
  * the int8 side on ARM kernels under qemu (`candidate`).

Sizes (text tokens, prompts, agreement tokens): the default 160,4,32 is the x86
gate's (GATE_TEXT has 119 tokens) and costs ~2 min under qemu -cpu cortex-a76. The
reduced 40,2,12 (~1.5 min on cortex-a72) was measured to be too noisy: on the same
model it gave a perplexity ratio of 1.16 where the full text gives 1.007.

usage:
  python armgate.py reference MODEL_DIR OUT.json      (x86, needs the convert extra)
  python armgate.py candidate MODEL_DIR REF.json OUT.json [--threads N]   (aarch64)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

TEXT_TOKENS = 160
PROMPTS = 4
AGREE_TOKENS = 32


def _graph_info(manifest: dict):
    from edged.engine.runner import GraphInfo

    return GraphInfo.from_manifest(manifest["graph"])


def _inputs(model_dir: Path, manifest: dict, text_tokens: int = TEXT_TOKENS, prompts: int = PROMPTS):
    """Token ids of the gate text and chat prompts, with the model's own tokenizer and template."""
    from tokenizers import Tokenizer

    from edged.engine.template import ChatTemplate
    from edged.models import gate as qgate

    tok = Tokenizer.from_file(str(model_dir / manifest["files_by_role"]["tokenizer"]))
    text = tok.encode(qgate.GATE_TEXT, add_special_tokens=False).ids[:text_tokens]
    tmpl_file = manifest["files_by_role"].get("chat_template")
    out = []
    for p in qgate.GATE_PROMPTS[:prompts]:
        if tmpl_file:
            t = ChatTemplate((model_dir / tmpl_file).read_text(), bos_token=manifest.get("bos_token") or "",
                             eos_token=manifest.get("eos_token") or "")
            rendered = t.render([{"role": "user", "content": p}], add_generation_prompt=True)
        else:
            rendered = p
        out.append(tok.encode(rendered, add_special_tokens=False).ids)
    return text, out


def reference(model_dir: Path, out: Path, sizes: tuple[int, int, int] = (TEXT_TOKENS, PROMPTS, AGREE_TOKENS)) -> dict:
    """fp32 perplexity and greedy continuations, from the model's source weights (x86)."""
    import tempfile

    from edged.engine.runner import EngineConfig, Runner
    from edged.models import gate as qgate
    from edged.models.builder import DecoderSpec, build_decoder, save_model
    from edged.models.convert import load_source

    manifest = json.loads((model_dir / "edged-model.json").read_text())
    src = load_source(Path(manifest["source"]["path"]), lambda m: print(m, file=sys.stderr))
    spec = DecoderSpec.from_hf_config(src.config)
    n_text, n_prompts, n_agree = sizes
    text, prompts = _inputs(model_dir, manifest, n_text, n_prompts)
    eos = set(manifest["eos_token_ids"])
    with tempfile.TemporaryDirectory(prefix="edged-arm-ref-") as d:
        fp32 = Path(d) / "fp32.onnx"
        save_model(build_decoder(spec, src.weights), str(fp32))
        runner = Runner(str(fp32), _graph_info(manifest), EngineConfig(threads=2))
        ppl = qgate.perplexity(runner, text)
        conts = [qgate.greedy(runner, p, n_agree, eos) for p in prompts]
        del runner
    ref = {
        "source_sha256": manifest["source"].get("sha256"),
        "sizes": {"text_tokens": n_text, "prompts": n_prompts, "agree_tokens": n_agree},
        "text_tokens": text,
        "prompts": prompts,
        "perplexity_fp32": ppl,
        "continuations_fp32": conts,
        "computed_on": platform.machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ref))
    return ref


def candidate(model_dir: Path, ref_path: Path, out: Path, threads: int) -> dict:
    """int8 side on this machine's kernels (aarch64 under qemu)."""
    import onnxruntime as ort

    from edged.engine.runner import EngineConfig, Runner
    from edged.models import gate as qgate

    manifest = json.loads((model_dir / "edged-model.json").read_text())
    ref = json.loads(ref_path.read_text())
    t0 = time.perf_counter()
    runner = Runner(str(model_dir / manifest["files_by_role"]["model"]), _graph_info(manifest), EngineConfig(threads=threads))
    ppl = qgate.perplexity(runner, ref["text_tokens"])
    hits = total = 0
    for prompt, cont in zip(ref["prompts"], ref["continuations_fp32"]):
        h, n = qgate.teacher_forced_agreement(runner, prompt, cont)
        hits, total = hits + h, total + n
    ratio = ppl / ref["perplexity_fp32"]
    agreement = hits / max(total, 1)
    failures = []
    if not ratio <= qgate.MAX_PPL_RATIO:
        failures.append(f"perplexity ratio {ratio:.3f} > {qgate.MAX_PPL_RATIO:.2f} (int8 {ppl:.2f} vs fp32 {ref['perplexity_fp32']:.2f})")
    if not agreement >= qgate.MIN_AGREEMENT:
        failures.append(f"greedy-token agreement {agreement:.3f} < {qgate.MIN_AGREEMENT:.2f} over {total} tokens")
    result = {
        "status": "passed" if not failures else "failed",
        "kind": "arm-" + ("full" if ref["sizes"]["text_tokens"] >= 160 and ref["sizes"]["prompts"] >= 4 else "reduced"),
        "perplexity_fp32": round(ref["perplexity_fp32"], 4),
        "perplexity_int8": round(ppl, 4),
        "perplexity_ratio": round(ratio, 4),
        "agreement": round(agreement, 4),
        "agreement_tokens": total,
        "perplexity_tokens": len(ref["text_tokens"]),
        "thresholds": {"max_perplexity_ratio": qgate.MAX_PPL_RATIO, "min_agreement": qgate.MIN_AGREEMENT},
        "failures": failures,
        "ran_on": f"{platform.machine()} onnxruntime {ort.__version__}",
        "fp32_reference_on": ref.get("computed_on"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("model_dir", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--sizes", default=f"{TEXT_TOKENS},{PROMPTS},{AGREE_TOKENS}",
                   help="text tokens,prompts,agreement tokens (full gate: 160,4,32)")
    c = sub.add_parser("candidate")
    c.add_argument("model_dir", type=Path)
    c.add_argument("ref", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "reference":
        ref = reference(a.model_dir, a.out, tuple(int(x) for x in a.sizes.split(",")))
        print(json.dumps({"perplexity_fp32": ref["perplexity_fp32"], "continuations": ref["continuations_fp32"]}))
        return 0
    res = candidate(a.model_dir, a.ref, a.out, a.threads)
    print(json.dumps(res))
    return 0 if res["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
