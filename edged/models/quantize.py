"""Quantization schemes, chosen per target ISA (see DEVELOPERS.md's quantization trap).

int8-block32    MatMulNBits, 8-bit symmetric weights in blocks of 32 along K,
                accuracy_level=4 (int8 activations, per block), after SmoothQuant.
                Correct on x86 and on ARM; the x86 default.
int8-dynamic    optimum's `arm64` configuration: dynamic quantization, uint8
                activations x int8 per-channel weights, QOperator format. Correct
                on ARM NEON, but on x86 AVX2 without VNNI the u8s8 kernels saturate
                and the model prints garbage -- the quality gate refuses it there.

Both use onnxruntime.quantization; nothing here reimplements a quantizer.
"""

from __future__ import annotations

import logging
import platform

SCHEMES = {
    "int8-block32": {"bits": 8, "block_size": 32, "accuracy_level": 4, "smoothquant_alpha": 0.5},
    "int8-dynamic": {"bits": 8, "activations": "uint8", "weights": "int8 per-channel", "format": "QOperator"},
}
TARGET_SCHEME = {"x86": "int8-block32", "arm64": "int8-dynamic"}
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
        share_tied_embedding(q.model.model, cfg["block_size"])
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


def share_tied_embedding(model, block_size: int) -> bool:
    """Let the token embedding read the LM head's int8 weights.

    With tied embeddings the quantized LM head [vocab, blocks, block] holds one
    row per token, which is exactly what GatherBlockQuantized needs: the fp32
    embedding table (113 MB for SmolLM2, a third of the model) is dropped and
    the embedding costs only a 3-D copy of the scales.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    props = {p.key: p.value for p in model.metadata_props}
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    if props.get("edged.tied_embeddings") != "1" or "lm_head.weight_T_Q8" not in inits:
        return False
    idx, gather = next((i, n) for i, n in enumerate(g.node) if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight")
    data = inits["lm_head.weight_T_Q8"]
    vocab, blocks = data.dims[0], data.dims[1]
    scales = numpy_helper.to_array(inits["lm_head.weight_T_scales"]).reshape(vocab, blocks, 1)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scales), "embed.scales"))
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "embed.shape"))
    g.initializer.remove(inits["model.embed_tokens.weight"])
    new = [
        helper.make_node(
            "GatherBlockQuantized",
            ["lm_head.weight_T_Q8", gather.input[1], "embed.scales"],
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
