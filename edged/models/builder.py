"""Build a fused ONNX decoder graph for Llama-family models from plain weights.

Why our own builder instead of optimum's export: optimum emits ~7,400 nodes of
shape arithmetic for SmolLM2 and a Python loop over it runs at half the speed
of the same weights in a fused graph. This builder emits onnxruntime's
contrib ops (GroupQueryAttention with rotary, SkipSimplifiedLayerNormalization)
so a 30-layer model is ~10 nodes per layer. The fp32 graph it writes is both the
quality-gate reference and the input of onnxruntime's weight quantizer.

Graph contract (the engine relies on it, see engine/runner.py):
  inputs   input_ids int64 [batch, seq]
           attention_mask int64 [batch, total]       (total = past + seq)
           past_key_values.{i}.key/value f32 [batch, kv_heads, buf, head_dim]
           num_logits int64 [1]                      (optional, default 1)
  outputs  logits f32 [batch, num_logits, vocab]     (the last num_logits positions)
           present.{i}.key/value                      (may alias the past buffer)
Past and present may be the same buffer of fixed length ("shared KV"), which
GroupQueryAttention updates in place: no per-token reallocation.

Only numpy and onnx are needed here; torch is used by the caller to read weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3")
LM_HEAD_BLOCK = 16384  # vocabulary columns per LM-head MatMul (see build_decoder)


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "DecoderSpec":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {model_type!r} is not supported by the graph builder "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        heads = cfg["num_attention_heads"]
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"activation {act!r} is not supported (only silu)")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        return cls(
            model_type=model_type,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            max_positions=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of KV cache one token costs across all layers (keys and values)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def rope_inv_freq(spec: DecoderSpec) -> np.ndarray:
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = spec.rope_scaling or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        # Llama 3.1/3.2 frequency-dependent scaling (long wavelengths are slowed).
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"rope scaling {kind!r} is not supported")


def split_fused_weights(spec: DecoderSpec, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Phi-3 stores q/k/v and gate/up fused; bring them to the Llama names."""
    if "model.layers.0.self_attn.qkv_proj.weight" not in weights:
        return weights
    out = dict(weights)
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        qkv = out.pop(p + "self_attn.qkv_proj.weight")
        out[p + "self_attn.q_proj.weight"] = qkv[:q]
        out[p + "self_attn.k_proj.weight"] = qkv[q : q + kv]
        out[p + "self_attn.v_proj.weight"] = qkv[q + kv :]
        gu = out.pop(p + "mlp.gate_up_proj.weight")
        out[p + "mlp.gate_proj.weight"] = gu[: spec.intermediate_size]
        out[p + "mlp.up_proj.weight"] = gu[spec.intermediate_size :]
    return out


def build_decoder(spec: DecoderSpec, weights: dict[str, np.ndarray]):
    """Return an onnx.ModelProto (fp32 weights, MatMul nodes ready for quantization)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = split_fused_weights(spec, weights)
    nodes: list = []
    inits: list = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs))
        return outputs

    def linear(x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        # HF stores [out, in]; MatMul wants [in, out]. The quantizer finds MatMul+initializer.
        (y,) = node("MatMul", [x, init(name + ".weight_T", weight.T.astype(np.float32))], [name + ".out"])
        if bias is not None:
            (y,) = node("Add", [y, init(name + ".bias", bias.astype(np.float32))], [name + ".biased"])
        return y

    H, KV, D, L = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
    ]
    # num_logits has an initializer of the same name: a default the caller may override
    # (onnxruntime's overridable initializer), so a plain run needs no extra input.
    inputs.append(helper.make_tensor_value_info("num_logits", TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logits_sequence", spec.vocab_size])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", KV, "past_sequence", D]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", KV, "present_sequence", D])
            )

    # GroupQueryAttention wants the index of the last valid position per row and the total length.
    one = init("const.one", np.array(1, dtype=np.int64))
    node("ReduceSum", ["attention_mask", init("const.axis1", np.array([1], dtype=np.int64))], ["mask.sum"], keepdims=0)
    node("Sub", ["mask.sum", one], ["mask.last"])
    node("Cast", ["mask.last"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask.shape"])
    node("Gather", ["mask.shape", one], ["mask.total"], axis=0)
    node("Cast", ["mask.total"], ["total_seq_len"], to=TensorProto.INT32)

    inv = rope_inv_freq(spec)
    freqs = np.outer(np.arange(spec.max_positions, dtype=np.float64), inv)
    cos = init("rope.cos", np.cos(freqs).astype(np.float32))
    sin = init("rope.sin", np.sin(freqs).astype(np.float32))

    embed = w["model.embed_tokens.weight"].astype(np.float32)
    (x,) = node("Gather", [init("model.embed_tokens.weight", embed), "input_ids"], ["embed.out"], axis=0)

    residual = x
    pending = None  # output of the previous block, not yet added to the residual
    eps = spec.rms_norm_eps

    def norm(name: str, gamma: np.ndarray) -> str:
        nonlocal residual, pending
        g = init(name, gamma.astype(np.float32))
        if pending is None:
            (y,) = node("SimplifiedLayerNormalization", [residual, g], [name + ".out"], axis=-1, epsilon=eps)
        else:
            y, _, _, residual = node(
                "SkipSimplifiedLayerNormalization",
                [pending, residual, g],
                [name + ".out", name + ".mean", name + ".inv_std", name + ".residual"],
                domain="com.microsoft",
                epsilon=eps,
            )
        pending = None
        return y

    for i in range(L):
        p = f"model.layers.{i}."
        h = norm(p + "input_layernorm.weight", w[p + "input_layernorm.weight"])
        qkv_w = np.concatenate(
            [w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"], w[p + "self_attn.v_proj.weight"]]
        )
        bias = None
        if (p + "self_attn.q_proj.bias") in w:
            bias = np.concatenate(
                [w[p + "self_attn.q_proj.bias"], w[p + "self_attn.k_proj.bias"], w[p + "self_attn.v_proj.bias"]]
            )
        qkv = linear(h, p + "self_attn.qkv_proj", qkv_w, bias)
        attn, _, _ = node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_seq_len", cos, sin],
            [p + "attn.out", f"present.{i}.key", f"present.{i}.value"],
            domain="com.microsoft",
            num_heads=H,
            kv_num_heads=KV,
            do_rotary=1,
            rotary_interleaved=0,
            scale=1.0 / math.sqrt(D),
        )
        pending = linear(attn, p + "self_attn.o_proj", w[p + "self_attn.o_proj.weight"])
        h = norm(p + "post_attention_layernorm.weight", w[p + "post_attention_layernorm.weight"])
        gate_up = linear(
            h, p + "mlp.gate_up_proj", np.concatenate([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
        )
        gate, up = node("Split", [gate_up], [p + "mlp.gate", p + "mlp.up"], axis=-1, num_outputs=2)
        node("Sigmoid", [gate], [p + "mlp.sig"])
        node("Mul", [gate, p + "mlp.sig"], [p + "mlp.silu"])
        node("Mul", [p + "mlp.silu", up], [p + "mlp.act"])
        pending = linear(p + "mlp.act", p + "mlp.down_proj", w[p + "mlp.down_proj.weight"])

    h = norm("model.norm.weight", w["model.norm.weight"])
    # Logits for the last num_logits positions only (1 unless the caller asks for more):
    # the vocabulary projection of a whole prompt would dominate prefill, and a decode
    # step needs one row. Speculative decoding (engine/lookup.py) verifies k drafted
    # tokens in one run and asks for their k + 1 rows.
    node("Neg", [init("num_logits", np.array([1], dtype=np.int64))], ["logits.start"])
    node("Slice", [h, "logits.start", init("const.end", np.array([np.iinfo(np.int64).max], dtype=np.int64)),
                   "const.axis1"], ["final.last"])
    lm = w.get("lm_head.weight")
    if lm is None or spec.tie_word_embeddings:
        lm = embed
    # The LM head in column blocks of at most LM_HEAD_BLOCK, joined by a Concat. Why:
    # onnxruntime prepacks each quantized weight at load while the file copy is still
    # mapped, so the largest single matrix sets the load-time memory peak (SmolLM2's
    # 49152-column head: 267 MiB high-water mark at session creation in one piece,
    # 246 MiB in three; decode speed unchanged).
    vocab = lm.shape[0]
    parts = -(-vocab // LM_HEAD_BLOCK)
    if parts == 1:
        node("MatMul", ["final.last", init("lm_head.weight_T", lm.T.astype(np.float32))], ["logits"])
    else:
        edges = np.linspace(0, vocab, parts + 1).astype(int)
        pieces = []
        for k in range(parts):
            part = init(f"lm_head.{k}.weight_T", lm[edges[k] : edges[k + 1]].T.astype(np.float32))
            pieces += node("MatMul", ["final.last", part], [f"lm_head.{k}.out"])
        node("Concat", pieces, ["logits"], axis=-1)

    graph = helper.make_graph(nodes, "edged-decoder", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
        producer_name="edged",
    )
    model.ir_version = 9
    return model


def save_model(model, path: str) -> list[str]:
    """Write model + one external-data file; return the file names written."""
    import os

    import onnx

    data_name = os.path.basename(path) + ".data"
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
    )
    return [os.path.basename(path), data_name]
