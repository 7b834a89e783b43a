"""The block-quantized weights of a GGUF file, as they are stored.

transformers' GGUF loader dequantizes every tensor to fp32; this reader keeps a
tensor's blocks instead, so that a 4-bit model can carry the source's own
numbers (models/quantize.py, scheme int4-block32) rather than a re-quantization
of their fp32 expansion. Block formats read (32 weights per block along a row,
llama.cpp's ggml-quants layout):

    Q4_0   fp16 d, 16 bytes of nibbles            w = d * (q - 8)
    Q4_1   fp16 d, fp16 m, 16 bytes of nibbles    w = d * q + m
    Q8_0   fp16 d, 32 int8                        w = d * q

In a Q4 block byte j holds weight j in its low nibble and weight j + 16 in its
high nibble. Other tensor types (F32, F16, K-quants, ...) are not returned; the
converter quantizes those from fp32.

Names are mapped to the Hugging Face names transformers gives the same tensors,
and llama-architecture Q/K rows are un-permuted the way transformers does
(llama.cpp's converter interleaves the rotary halves of each head); the
permutation moves whole rows, so blocks (which run along a row) survive it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 32
KINDS = ("Q4_0", "Q4_1", "Q8_0")

# GGUF tensor name (blk.N. prefix removed) -> Hugging Face name (model.layers.N. prefix removed)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head"}


@dataclass
class Blocks:
    """One weight matrix [N rows (outputs), K columns (inputs)] in blocks of 32 along K.

    q: uint8 [N, K] for Q4 (0..15) or int8 [N, K] for Q8_0; d: float32 [N, K/32];
    m: float32 [N, K/32] for Q4_1, else None. fp16 block constants widen to fp32 exactly."""

    kind: str
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], computed as llama.cpp and transformers do (per element in fp32)."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
        d = self.d[:, :, None]
        if self.kind == "Q4_0":
            w = d * (q - 8.0)
        elif self.kind == "Q4_1":
            w = d * q + self.m[:, :, None]
        else:
            w = d * q
        return w.reshape(n, k).astype(np.float32)

    def rows(self, order: np.ndarray | slice) -> "Blocks":
        return Blocks(self.kind, self.q[order], self.d[order], None if self.m is None else self.m[order])

    @staticmethod
    def concat(parts: list["Blocks"]) -> "Blocks":
        """Stack along N (rows): a packed QKV or gate/up weight. Same kind required."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot pack blocks of different kinds {sorted(kinds)}")
        m = None if parts[0].m is None else np.concatenate([p.m for p in parts])
        return Blocks(parts[0].kind, np.concatenate([p.q for p in parts]), np.concatenate([p.d for p in parts]), m)


def _unpack(kind: str, raw: np.ndarray, n: int, k: int) -> Blocks:
    """raw: uint8 [n, bytes per row] as stored."""
    nb = k // BLOCK
    b = raw.reshape(n, nb, -1)
    d = b[:, :, 0:2].copy().view("<f2")[:, :, 0].astype(np.float32)
    if kind == "Q8_0":
        q = b[:, :, 2:34].copy().view(np.int8).reshape(n, k)
        return Blocks(kind, q, d)
    off = 2 if kind == "Q4_0" else 4
    m = b[:, :, 2:4].copy().view("<f2")[:, :, 0].astype(np.float32) if kind == "Q4_1" else None
    qs = b[:, :, off : off + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)  # weights 0..15, then 16..31
    return Blocks(kind, q.astype(np.uint8), d, m)


def _reverse_permute(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (as transformers' GGUF loader does)."""
    dim = rows // n_head // 2
    return np.arange(rows).reshape(n_head, dim, 2).swapaxes(2, 1).reshape(rows)


def read_blocks(path: Path | str, *, num_heads: int | None = None, num_kv_heads: int | None = None) -> dict[str, Blocks]:
    """Hugging Face weight name -> Blocks, for every Q4_0/Q4_1/Q8_0 weight the file holds
    under a known name. Needs the `gguf` package (the convert extra)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
    out: dict[str, Blocks] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in KINDS or not t.name.endswith(".weight"):
            continue
        base = t.name[: -len(".weight")]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
        elif base in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[base] + ".weight"
        else:
            continue
        k, n = (int(x) for x in t.shape[:2])  # ggml order: row length first
        if k % BLOCK:
            continue
        blocks = _unpack(kind, np.asarray(t.data), n, k)
        if arch == "llama" and num_heads and num_kv_heads:
            if base.endswith(".attn_q"):
                blocks = blocks.rows(_reverse_permute(n, num_heads))
            elif base.endswith(".attn_k"):
                blocks = blocks.rows(_reverse_permute(n, num_kv_heads))
        out[name] = blocks
    return out


def graph_blocks(hf: dict[str, Blocks], num_layers: int, *, tied: bool, lm_head_widths: list[int]) -> dict[str, Blocks]:
    """Blocks for the MatMul weights of models/builder.py's graph, keyed by its initializer
    names: packed q|k|v, o, packed gate|up, down per layer, and the LM head in column
    pieces of `lm_head_widths` (lm_head.K.weight_T; one piece: lm_head.weight_T). A weight
    whose parts are missing or of mixed kinds is left out (the converter quantizes it)."""
    out: dict[str, Blocks] = {}

    def put(graph_name: str, names: list[str]) -> None:
        if all(n in hf for n in names):
            try:
                out[graph_name] = Blocks.concat([hf[n] for n in names])
            except ValueError:
                pass

    for i in range(num_layers):
        p = f"model.layers.{i}."
        put(p + "self_attn.qkv_proj.weight_T", [p + f"self_attn.{x}_proj.weight" for x in "qkv"])
        put(p + "self_attn.o_proj.weight_T", [p + "self_attn.o_proj.weight"])
        put(p + "mlp.gate_up_proj.weight_T", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        put(p + "mlp.down_proj.weight_T", [p + "mlp.down_proj.weight"])
    head = hf.get("model.embed_tokens.weight") if tied or "lm_head.weight" not in hf else hf["lm_head.weight"]
    if head is not None and sum(lm_head_widths) == head.shape[0]:
        if len(lm_head_widths) == 1:
            out["lm_head.weight_T"] = head
        else:
            start = 0
            for j, w in enumerate(lm_head_widths):
                out[f"lm_head.{j}.weight_T"] = head.rows(slice(start, start + w))
                start += w
    return out
