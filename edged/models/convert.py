"""`edged convert` / `edged pull`: source weights -> gated int8 model in the store.

  1. load      GGUF (dequantized by transformers' GGUF loader) or an HF folder -> fp32
  2. build     fused fp32 ONNX graph (models/builder.py), the gate's reference
  3. calibrate per-channel activation maxima on a short text (for SmoothQuant)
  4. quantize  the scheme of the target ISA, or --scheme (models/quantize.py); int4-block32
               from a GGUF carries the file's own blocks over (models/gguf_blocks.py)
  5. gate      quantized vs fp32 (models/gate.py); refuse on failure, nothing installed
  6. install   tokenizer, chat template, manifest; one rename makes it visible

Needs the `convert` extra (torch, transformers, onnx); never imported at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edged.engine.embedding import FILENAME as EMBEDDING_FILE
from edged.errors import ConversionError, EdgedError, MissingExtra, QualityGateFailed
from edged.models.store import Model, ModelStore, check_name

Progress = Callable[[str], None]

# Bump when the graph or the quantization changes: `edged pull` re-prepares models
# made by an older converter instead of calling them up to date.
CONVERTER_VERSION = 4  # 3: embedding table out of the graph, LM head in column blocks; 4: num_logits input

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")


@dataclass
class Source:
    kind: str  # gguf | hf
    path: Path
    config: dict
    weights: dict[str, np.ndarray]
    tokenizer: object  # transformers PreTrainedTokenizerFast
    chat_template: str | None
    generation_config: dict


def _require_convert_extra():
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingExtra(
            f"converting needs the convert extra ({e.name} is missing): pip install 'edged[convert]'"
        ) from None


def load_source(source: Path, say: Progress) -> Source:
    _require_convert_extra()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        kind, kw, folder = "gguf", {"gguf_file": source.name}, source.parent
        say(f"load: dequantizing {source.name} to fp32")
    elif source.is_dir() and (source / "config.json").is_file():
        kind, kw, folder = "hf", {}, source
        say(f"load: reading Hugging Face model from {source}")
    else:
        raise ConversionError(f"{source}: expected a .gguf file or a Hugging Face model folder with config.json")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    except Exception as e:
        raise ConversionError(f"{source}: could not be loaded: {type(e).__name__}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ConversionError(f"{source}: no fast tokenizer (tokenizer.json) could be built")
    config = model.config.to_dict()
    weights = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    gen = model.generation_config.to_dict() if model.generation_config is not None else {}
    return Source(kind, source, config, weights, tok, tok.chat_template, gen)


def _eos_ids(src: Source) -> list[int]:
    ids = set()
    for v in (src.config.get("eos_token_id"), src.generation_config.get("eos_token_id")):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(int(x) for x in v)
    vocab = src.tokenizer.get_vocab()
    # Chat models end a turn with a marker the config does not always list (SmolLM2's
    # GGUF names <|im_start|> as EOS); stopping at any end-of-turn marker is safe.
    for marker in END_MARKERS:
        if marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)


def _generation_defaults(src: Source) -> dict:
    """Sampling settings the source's generation_config asks for (request option names)."""
    g = src.generation_config
    out = {}
    if g.get("do_sample") and g.get("temperature") is not None:
        out["temperature"] = float(g["temperature"])
    if g.get("do_sample") and g.get("top_p") is not None:
        out["top_p"] = float(g["top_p"])
    if g.get("do_sample") and g.get("top_k") is not None:
        out["top_k"] = int(g["top_k"])
    if g.get("repetition_penalty") not in (None, 1.0):
        out["repeat_penalty"] = float(g["repetition_penalty"])
    return out


def _calibrate(fp32_path: Path, points: list[str], tokens: list[int], info) -> dict[str, np.ndarray]:
    """Per-channel max |x| at `points`, from one prefill of the fp32 graph."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(str(fp32_path), load_external_data=False)
    for name in points:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    calib = fp32_path.with_name("calibrate.onnx")
    onnx.save_model(m, str(calib))  # weights stay in fp32.onnx.data, referenced by relative path
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(calib), so, providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": np.asarray([tokens], np.int64),
        "attention_mask": np.ones((1, len(tokens)), np.int64),
    }
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
    outs = sess.run(points, feed)
    return {n: np.abs(o).reshape(-1, o.shape[-1]).max(0) for n, o in zip(points, outs)}


def convert(
    source: Path,
    name: str,
    *,
    target: str | None = None,
    scheme: str | None = None,
    store: ModelStore | None = None,
    progress: Progress | None = None,
    source_info: dict | None = None,
    threads: int | None = None,
    generation_defaults: dict | None = None,
) -> Model:
    """Convert `source` into the store as `name`.

    generation_defaults: the model's recommended request options, written to
    generation.json and the manifest; None takes them from the source's generation_config.
    """
    from edged.engine.runner import EngineConfig, GraphInfo, Runner
    from edged.models import gate as qgate
    from edged.models.builder import DecoderSpec, build_decoder, save_model
    from edged.models.quantize import PORTABLE_SCHEMES, SCHEMES, TARGET_SCHEME, TARGETS, host_target, quantize
    from edged.models.smooth import calibration_points, smooth

    say = progress or (lambda *_: None)
    check_name(name)
    host = host_target()
    target = target or host
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    scheme = scheme or TARGET_SCHEME[target]
    if scheme not in SCHEMES:
        raise ConversionError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    store = store or ModelStore()
    store.sweep()
    t_start = time.time()

    src = load_source(Path(source), say)
    try:
        spec = DecoderSpec.from_hf_config(src.config)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{source}: {e}") from None
    info = GraphInfo(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size)

    staging = store.staging(name)
    work = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-work-", dir=store.root))
    try:
        fast_tok = src.tokenizer.backend_tokenizer
        fast_tok.save(str(staging / "tokenizer.json"))
        if src.chat_template:
            (staging / "chat_template.jinja").write_text(src.chat_template)

        say("build: fp32 ONNX graph")
        fp32 = work / "fp32.onnx"
        save_model(build_decoder(spec, src.weights), str(fp32))
        weights = src.weights
        blocks = _source_blocks(src, spec, scheme, say)
        if SCHEMES[scheme].get("smoothquant_alpha") and not blocks:
            say("calibrate: activation ranges")
            calib_tokens = fast_tok.encode(qgate.GATE_TEXT, add_special_tokens=False).ids[:256]
            amax = _calibrate(fp32, calibration_points(spec), calib_tokens, info)
            weights = smooth(spec, weights, amax, SCHEMES[scheme]["smoothquant_alpha"])
            pre = work / "smoothed.onnx"
            save_model(build_decoder(spec, weights), str(pre))
        else:
            pre = fp32
        say(f"quantize: {scheme} for {target}")
        report = quantize(
            str(pre), str(staging / "model.onnx"), scheme,
            source_blocks=blocks, num_layers=spec.num_layers, tied=spec.tie_word_embeddings,
        )

        eos = _eos_ids(src)
        bos = src.tokenizer.bos_token
        eos_tok = src.tokenizer.eos_token
        if target == host or scheme in PORTABLE_SCHEMES:
            cfg = EngineConfig(threads=threads)
            ref = Runner(str(fp32), info, cfg)
            cand = Runner(str(staging / "model.onnx"), info, cfg)
            text_tokens = fast_tok.encode(qgate.GATE_TEXT, add_special_tokens=False).ids[:160]
            prompts = [_gate_prompt(src, p) for p in qgate.GATE_PROMPTS]
            result = qgate.evaluate(ref, cand, text_tokens=text_tokens, prompts=prompts, eos=set(eos), progress=say)
            result["ran_on"] = host
            if target != host:
                result["note"] = (
                    f"gated on {host} kernels; the {target} kernels are gated under emulation by build-arm.sh --verify"
                )
            del ref, cand
            if result["status"] != "passed":
                hint = ""
                if scheme != TARGET_SCHEME[target]:
                    hint = f"; {scheme} loses too much for this model: the default {TARGET_SCHEME[target]} keeps more"
                raise QualityGateFailed(
                    f"quality gate refused {name!r} ({scheme} for {target}): " + "; ".join(result["failures"]) + hint,
                    gate=result,
                )
        else:
            result = {
                "status": "deferred",
                "reason": f"quantized for {target}; this host is {host} and cannot run {target} kernels. "
                f"Gate it on {target} (build-arm.sh --verify runs it under emulation).",
            }
        say("install")
        manifest = {
            "source": {"kind": src.kind, "path": str(src.path), **(source_info or {})},
            "architecture": spec.model_type,
            "target": target,
            "quantization": {
                "scheme": scheme,
                "precision": f"int{SCHEMES[scheme]['bits']}",
                **SCHEMES[scheme],
                **({"smoothquant_alpha": None} if blocks else {}),  # the source's blocks are used unsmoothed
                **report,
            },
            "graph": {
                "kind": "edged-fused-v2",  # v2: inputs_embeds + embedding table file
                "shared_kv": True,
                "num_layers": spec.num_layers,
                "num_kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim,
                "vocab_size": spec.vocab_size,
                "hidden_size": spec.hidden_size,
                "kv_bytes_per_token": spec.kv_bytes_per_token(),
            },
            "context_length": spec.max_positions,
            "eos_token_ids": eos,
            "bos_token": bos,
            "eos_token": eos_tok,
            "generation_defaults": (
                dict(generation_defaults) if generation_defaults is not None else _generation_defaults(src)
            ),
            "files_by_role": {
                "model": "model.onnx",
                **({"embedding": EMBEDDING_FILE} if (staging / EMBEDDING_FILE).is_file() else {}),
                "tokenizer": "tokenizer.json",
                **({"chat_template": "chat_template.jinja"} if src.chat_template else {}),
            },
            "gate": result,
            "converter_version": CONVERTER_VERSION,
            "conversion_seconds": round(time.time() - t_start, 1),
        }
        (staging / "generation.json").write_text(json.dumps(manifest["generation_defaults"], indent=2))
        model = store.install(staging, name, manifest)
        return model
    except EdgedError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConversionError(f"converting {source} failed: {type(e).__name__}: {e}") from e
    except BaseException:  # interrupted: leave nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source_blocks(src: Source, spec, scheme: str, say: Progress) -> dict:
    """The GGUF's own Q4_0/Q4_1/Q8_0 weight blocks, for schemes that carry them over; {}
    for other schemes and sources. With blocks, nothing is smoothed: the quantized model
    computes with the source's numbers, and the fp32 reference is their expansion."""
    from edged.models.quantize import SCHEMES

    if not SCHEMES[scheme].get("source_blocks") or src.kind != "gguf":
        return {}
    from edged.models.gguf_blocks import read_blocks

    say("read: the GGUF's quantized blocks")
    try:
        return read_blocks(src.path, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads)
    except ImportError as e:
        raise MissingExtra(f"reading GGUF blocks needs the convert extra ({e.name} is missing): pip install 'edged[convert]'") from None


def _gate_prompt(src: Source, text: str) -> list[int]:
    tok = src.tokenizer
    if src.chat_template:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    else:
        rendered = text
    return tok.backend_tokenizer.encode(rendered, add_special_tokens=False).ids

