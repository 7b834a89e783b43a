"""Quantization schemes, chosen per target ISA (see DEVELOPERS.md's quantization trap).

int8-block32    MatMulNBits, 8-bit symmetric weights in blocks of 32 along K,
                accuracy_level=4 (int8 activations, per block), after SmoothQuant.
                The default on both targets: it passed the gate on x86 and on ARM
                kernels under qemu (Cortex-A72 and A76, docs/arm.md). The token
                embedding goes to its own int8 table file read by the engine
                (engine/embedding.py).
int8-block64    The same in blocks of 64: fp32 block scales are 1/16 of the weight
                bytes instead of 1/8 (151 -> 143 MB streamed per token for SmolLM2,
                ~5 % faster decode), but activations are quantized in coarser blocks
                too. On SmolLM2 it passes the gate (ratio 0.998, agreement 0.946) yet
                free-running greedy output leaves fp32's earlier (first divergence
                at tokens 8/17/0/6 of 32 against 8/32/16/32 for blocks of 32), so it
                is not the default. `--scheme int8-block64`.
int8-dynamic    optimum's `arm64` configuration: dynamic quantization, uint8
                activations x int8 per-channel weights, QOperator format. Runs on
                ARM NEON but missed the agreement threshold there (0.763 < 0.80 on
                A76 kernels); on x86 AVX2 without VNNI the u8s8 kernels saturate
                and the model prints garbage -- the quality gate refuses it there.
                Kept for `--scheme int8-dynamic` and for the test of the gate.

Both use onnxruntime.quantization; nothing here reimplements a quantizer.
"""

from __future__ import annotations

import logging
import os
import platform

from edged.engine.embedding import FILENAME as EMBEDDING_FILE

SCHEMES = {
    "int8-block32": {"bits": 8, "block_size": 32, "accuracy_level": 4, "smoothquant_alpha": 0.5},
    # alpha 0.6 at block 64: coarser activation blocks need a little more of the outliers
    # moved into the weights. SmolLM2, gate: alpha 0.5 ratio 1.006 but the Paris answer
    # flips; 0.6 ratio 0.998, agreement 0.946, Paris kept; 0.7 ratio 1.017, agreement 0.914.
    "int8-block64": {"bits": 8, "block_size": 64, "accuracy_level": 4, "smoothquant_alpha": 0.6},
    "int8-dynamic": {"bits": 8, "activations": "uint8", "weights": "int8 per-channel", "format": "QOperator"},
}
TARGET_SCHEME = {"x86": "int8-block32", "arm64": "int8-block32"}
# Schemes whose kernels exist and give the same results class on every ISA we target:
# a model quantized for another target can still be gated on this host.
PORTABLE_SCHEMES = {"int8-block32", "int8-block64"}
TARGETS = tuple(TARGET_SCHEME)


def host_target() -> str:
    m = platform.machine().lower()
    if m in ("aarch64", "arm64"):
        return "arm64"
    if m in ("x86_64", "amd64", "i686", "i386"):
        return "x86"
    return m


def quantize(fp32_path: str, out_path: str, scheme: str) -> None:
    """Quantize the fp32 graph at fp32_path into out_path (+ external data)."""
    from edged.models.builder import save_model

    if SCHEMES.get(scheme, {}).get("block_size"):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        cfg = SCHEMES[scheme]
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        q = MatMulNBitsQuantizer(
            onnx.load(fp32_path),
            bits=cfg["bits"],
            block_size=cfg["block_size"],
            is_symmetric=True,
            accuracy_level=cfg["accuracy_level"],
        )
        q.process()
        if not extract_embedding(q.model.model, os.path.join(os.path.dirname(out_path), EMBEDDING_FILE)):
            raise ValueError("the graph has no token embedding Gather on input_ids to move out")
        save_model(q.model.model, out_path)
    elif scheme == "int8-dynamic":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # These arguments are what optimum's AutoQuantizationConfig.arm64(is_static=False,
        # per_channel=True) passes to onnxruntime; calling onnxruntime directly keeps
        # optimum out of the conversion of models we build ourselves.
        quantize_dynamic(
            fp32_path,
            out_path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=False,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=True,
            # shape inference cannot see through contrib ops (GroupQueryAttention): say fp32
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


def extract_embedding(model, table_path: str, block_size: int = 32) -> bool:
    """Move the token embedding out of the graph into an int8 table file.

    The graph's Gather on input_ids is replaced by an `inputs_embeds` input, and
    the table is written for engine/embedding.py, which reads only the rows of the
    tokens it needs with pread (see there for why this is not a Gather in the
    graph). Rows are quantized by onnxruntime's block quantizer, symmetric int8 in
    blocks of `block_size` along the hidden dimension, like the weights.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    from edged.engine.embedding import write_table

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    found = [n for n in g.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight" and n.input[1] == "input_ids"]
    if not found or "model.embed_tokens.weight" not in inits:
        return False
    gather = found[0]
    table = numpy_helper.to_array(inits["model.embed_tokens.weight"]).astype(np.float32)
    vocab, hidden = table.shape
    while hidden % block_size:  # e.g. hidden 1000: blocks of 8
        block_size //= 2
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8))
    # The quantizer works on a [K, N] MatMul weight blockwise along K; the transposed
    # table gives one row of blocks per token: uint8 [vocab, hidden / block, block]
    # holding value + 128, and float scales [vocab, hidden / block].
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(table.T))
    values = (packed.reshape(vocab, hidden).astype(np.int16) - 128).astype(np.int8)
    write_table(table_path, values, np.asarray(scales, np.float32).reshape(vocab, hidden // block_size))

    embeds = gather.output[0]
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == embeds:
                n.input[k] = "inputs_embeds"
    g.node.remove(gather)
    g.initializer.remove(inits["model.embed_tokens.weight"])
    ids = next(i for i in g.input if i.name == "input_ids")
    pos = list(g.input).index(ids)
    g.input.remove(ids)
    g.input.insert(pos, helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", hidden]))
    return True
