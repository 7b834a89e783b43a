"""SmoothQuant-style rebalancing before int8 quantization.

Why: the fast int8 kernel (MatMulNBits, accuracy_level=4) also quantizes the
activations to int8 per block. SmolLM2's activations have outlier channels
(hundreds to thousands while others are ~1), and quantizing them as they are
flipped the greedy answer of the quality-gate prompts. Moving a per-channel
scale s from the activation into the weights (x/s · s·W, exact in fp32) evens
out both sides. s_j = max|x_j|^a / max|W_j|^(1-a), a = 0.5 (Xiao et al., 2023).

The scales are folded into tensors that already exist, so the graph is unchanged:
  qkv and gate/up inputs -> the RMSNorm gamma before them
  down_proj input        -> the output channels of up_proj
  o_proj input           -> the output channels of v_proj (shared by a KV group)
"""

from __future__ import annotations

import numpy as np

from edged.models.builder import DecoderSpec, split_fused_weights


def calibration_points(spec: DecoderSpec) -> list[str]:
    """Graph tensors (builder names) whose per-channel max |x| we need."""
    pts = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        pts += [p + "input_layernorm.weight.out", p + "attn.out", p + "post_attention_layernorm.weight.out", p + "mlp.act"]
    return pts


def _scale(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-2, 1e3).astype(np.float32)


def smooth(spec: DecoderSpec, weights: dict[str, np.ndarray], amax: dict[str, np.ndarray], alpha: float = 0.5):
    w = dict(split_fused_weights(spec, weights))
    H, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group = H // KV
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        for norm, projs, point in (
            ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "input_layernorm.weight.out"),
            ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "post_attention_layernorm.weight.out"),
        ):
            wmax = np.max([np.abs(w[p + x + ".weight"]).max(0) for x in projs], axis=0)
            s = _scale(amax[p + point], wmax, alpha)
            w[p + norm + ".weight"] = w[p + norm + ".weight"] / s
            for x in projs:
                w[p + x + ".weight"] = w[p + x + ".weight"] * s
        s = _scale(amax[p + "mlp.act"], np.abs(w[p + "mlp.down_proj.weight"]).max(0), alpha)
        w[p + "mlp.up_proj.weight"] = w[p + "mlp.up_proj.weight"] / s[:, None]
        if p + "mlp.up_proj.bias" in w:
            w[p + "mlp.up_proj.bias"] = w[p + "mlp.up_proj.bias"] / s
        w[p + "mlp.down_proj.weight"] = w[p + "mlp.down_proj.weight"] * s
        # attention output channel (head h, dim d) comes from value channel (h // group, d)
        xmax = amax[p + "attn.out"].reshape(KV, group, D).max(1)
        wmax = np.abs(w[p + "self_attn.o_proj.weight"]).max(0).reshape(KV, group, D).max(1)
        s = _scale(xmax, wmax, alpha)
        w[p + "self_attn.v_proj.weight"] = w[p + "self_attn.v_proj.weight"] / s.reshape(-1)[:, None]
        if p + "self_attn.v_proj.bias" in w:
            w[p + "self_attn.v_proj.bias"] = w[p + "self_attn.v_proj.bias"] / s.reshape(-1)
        w[p + "self_attn.o_proj.weight"] = w[p + "self_attn.o_proj.weight"] * np.repeat(s[:, None, :], group, 1).reshape(-1)
    return w
