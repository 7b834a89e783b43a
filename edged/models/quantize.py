"""Quantization schemes, chosen per target ISA (see DEVELOPERS.md's quantization trap).

int8-block32    MatMulNBits, 8-bit symmetric weights in blocks of 32 along K,
                accuracy_level=4 (int8 activations, per block), after SmoothQuant.
                The default on both targets: it passed the gate on x86 and on ARM
                kernels under qemu (Cortex-A72 and A76, docs/arm.md).
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
import platform

SCHEMES = {
    "int8-block32": {"bits": 8, "block_size": 32, "accuracy_level": 4, "smoothquant_alpha": 0.5},
    "int8-dynamic": {"bits": 8, "activations": "uint8", "weights": "int8 per-channel", "format": "QOperator"},
}
TARGET_SCHEME = {"x86": "int8-block32", "arm64": "int8-block32"}
# Schemes whose kernels exist and give the same results class on every ISA we target:
# a model quantized for another target can still be gated on this host.
PORTABLE_SCHEMES = {"int8-block32"}
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

    if scheme == "int8-block32":
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
        quantize_embedding(q.model.model, cfg["block_size"])
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


def quantize_embedding(model, block_size: int) -> bool:
    """Replace the fp32 token embedding with an int8 copy read by GatherBlockQuantized.

    The table is stored in its own initializer (not shared with the LM head):
    onnxruntime maps external data, and a table nobody prepacks stays on disk
    except for the rows of tokens actually seen, so it costs almost no resident
    memory while the file shrinks by three quarters of the table.
    """
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    found = [(i, n) for i, n in enumerate(g.node) if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight"]
    if not found or "model.embed_tokens.weight" not in inits:
        return False
    idx, gather = found[0]
    table = numpy_helper.to_array(inits["model.embed_tokens.weight"]).astype(np.float32)
    vocab, hidden = table.shape
    if hidden % block_size:
        return False
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8))
    # The quantizer works on a [K, N] MatMul weight blockwise along K; the transposed
    # table gives one row of blocks per token: [vocab, hidden / block, block].
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(table.T))
    g.initializer.extend(
        [
            numpy_helper.from_array(packed, "embed.q8"),
            numpy_helper.from_array(np.ascontiguousarray(scales.reshape(vocab, -1, 1)), "embed.scales"),
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "embed.shape"),
        ]
    )
    g.initializer.remove(inits["model.embed_tokens.weight"])
    new = [
        helper.make_node(
            "GatherBlockQuantized",
            ["embed.q8", gather.input[1], "embed.scales"],
            ["embed.blocks"],
            name="embed/GatherBlockQuantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=2,
            block_size=block_size,
            bits=8,
        ),
        helper.make_node("Reshape", ["embed.blocks", "embed.shape"], [gather.output[0]], name="embed/Reshape"),
    ]
    g.node.remove(gather)
    for j, n in enumerate(new):
        g.node.insert(idx + j, n)
    return True
