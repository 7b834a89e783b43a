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
int4-block32    MatMulNBits 4-bit in blocks of 32 along K, accuracy_level=4, for
                the decoder layers; the LM head stays 8-bit (block 32). From a
                GGUF, the source's own Q4_0 / Q4_1 / Q8_0 blocks are carried over
                unchanged (models/gguf_blocks.py): a block w = d*(q - 8) is
                MatMulNBits' symmetric 4-bit form; Q4_1's w = d*q + m becomes
                d*(q - 8) + m' with m' = m + 8d, and the m' term is added by a small
                fp32 MatMul of the input's per-block sums (sum_b(x) @ m'). Why not
                MatMulNBits' float zero points, which express Q4_1 directly:
                onnxruntime does not prepack such weights and dequantizes the whole
                matrix on every call (about 20x slower per decode step here).
                A Q8_0 block is the 8-bit form with the default zero point 128; a
                Q8_0 token embedding becomes the embedding table as it is. No
                SmoothQuant then (it would change the weights). Weights without
                such blocks (Hugging Face sources, other GGUF types) are quantized
                by onnxruntime (asymmetric 4-bit, uint4 zero points) after
                SmoothQuant, as for int8. `--scheme int4-block32`.

Quantizing uses onnxruntime.quantization; the block-copying path only re-packs
numbers that a GGUF file already holds.
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
    # The LM head at 8 bits: 4-bit logits move the gate's agreement most, and llama.cpp's
    # Q4 files keep the output matrix at 6-8 bits too (SmolLM2's Q4_1 file: Q8_0).
    "int4-block32": {"bits": 4, "block_size": 32, "accuracy_level": 4, "lm_head_bits": 8,
                     "smoothquant_alpha": 0.5, "source_blocks": True},
}
TARGET_SCHEME = {"x86": "int8-block32", "arm64": "int8-block32"}
# Schemes whose kernels exist and give the same results class on every ISA we target:
# a model quantized for another target can still be gated on this host.
PORTABLE_SCHEMES = {"int8-block32", "int8-block64", "int4-block32"}
TARGETS = tuple(TARGET_SCHEME)


def host_target() -> str:
    m = platform.machine().lower()
    if m in ("aarch64", "arm64"):
        return "arm64"
    if m in ("x86_64", "amd64", "i686", "i386"):
        return "x86"
    return m


def quantize(fp32_path: str, out_path: str, scheme: str, *, source_blocks: dict | None = None,
             num_layers: int = 0, tied: bool = False) -> dict:
    """Quantize the fp32 graph at fp32_path into out_path (+ external data).

    source_blocks: Hugging Face weight name -> gguf_blocks.Blocks of the source file, for
    schemes that carry them over (int4-block32). Returns what was done, for the manifest."""
    from edged.models.builder import save_model

    cfg = SCHEMES.get(scheme)
    if cfg is None:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    report: dict = {}
    if cfg.get("block_size"):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        model = onnx.load(fp32_path)
        table = None
        if cfg.get("source_blocks") and source_blocks:
            report["source_blocks"] = _carry_blocks(model, source_blocks, num_layers, tied, cfg["accuracy_level"])
            emb = source_blocks.get("model.embed_tokens.weight")
            if emb is not None and emb.kind == "Q8_0":
                table = (emb.q, emb.d)
        head_bits = cfg.get("lm_head_bits", cfg["bits"])
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        weights = [n for n in matmuls if n.input[1].endswith(".weight_T")]  # the builder's weights, not offsets
        head = {n.name for n in weights if n.input[1].startswith("lm_head")}
        for bits, names in ((cfg["bits"], {n.name for n in weights} - head), (head_bits, head)):
            if not names:
                continue
            q = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=cfg["block_size"],
                # 8-bit symmetric (the int8 schemes); 4-bit with zero points: 16 levels are
                # too few to spend one on a range the block does not use
                is_symmetric=bits == 8,
                accuracy_level=cfg["accuracy_level"],
                nodes_to_exclude=[n.name for n in matmuls if n.name not in names],
            )
            q.process()
            model = q.model.model
            matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        if not extract_embedding(model, os.path.join(os.path.dirname(out_path), EMBEDDING_FILE), table=table):
            raise ValueError("the graph has no token embedding Gather on input_ids to move out")
        if table is not None:
            report.setdefault("source_blocks", {})["embedding"] = "Q8_0 blocks copied"
        save_model(model, out_path)
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
    return report


def _carry_blocks(model, hf_blocks: dict, num_layers: int, tied: bool, accuracy_level: int) -> dict:
    """Replace each MatMul whose weight the source holds in blocks by a MatMulNBits that
    computes with exactly those numbers. A block set is used only if it expands to the
    fp32 weight the graph has (which the gate's reference was built from); otherwise
    the MatMul is left for the quantizer and counted under "requantized"."""
    import re

    from onnx import numpy_helper

    from edged.models.gguf_blocks import graph_blocks

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    heads = sorted(
        (n for n in inits if re.fullmatch(r"lm_head(\.\d+)?\.weight_T", n)),
        key=lambda n: int(n.split(".")[1]) if n.count(".") == 2 else 0,
    )
    widths = [int(inits[n].dims[1]) for n in heads]
    by_init = graph_blocks(hf_blocks, num_layers, tied=tied, lm_head_widths=widths)
    kinds: dict[str, int] = {}
    mismatched: list[str] = []
    worst = 0.0
    for node in list(g.node):
        if node.op_type != "MatMul" or node.input[1] not in by_init or node.input[1] not in inits:
            continue
        blocks = by_init[node.input[1]]
        w = numpy_helper.to_array(inits[node.input[1]])  # [K, N]
        if w.shape != blocks.shape[::-1]:
            mismatched.append(node.input[1])
            continue
        diff = float(abs(blocks.dequantize().T - w).max())
        if diff > 1e-6 * float(abs(w).max()):
            mismatched.append(node.input[1])
            continue
        worst = max(worst, diff)
        _replace_with_blocks(g, node, blocks, accuracy_level)
        g.initializer.remove(inits.pop(node.input[1]))
        kinds[blocks.kind] = kinds.get(blocks.kind, 0) + 1
    return {"matmuls": kinds, "max_abs_diff_vs_fp32": worst, "requantized": mismatched}


def _replace_with_blocks(g, node, blocks, accuracy_level: int) -> None:
    """MatMul(x, W) -> MatMulNBits over `blocks` (+ the Q4_1 offset term), same output name."""
    import numpy as np
    from onnx import helper, numpy_helper

    from edged.models.gguf_blocks import BLOCK

    n, k = blocks.shape
    nb = k // BLOCK
    base = node.input[1][: -len(".weight_T")] if node.input[1].endswith(".weight_T") else node.input[1]
    x, y = node.input[0], node.output[0]
    if blocks.kind == "Q8_0":
        bits = 8
        packed = (blocks.q.astype(np.int16) + 128).astype(np.uint8).reshape(n, nb, BLOCK)  # zero point 128
    else:
        bits = 4
        q = blocks.q.reshape(n, nb, BLOCK // 2, 2)
        packed = (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)  # element 2j low nibble, 2j+1 high
    new = [numpy_helper.from_array(packed, base + f".Q{bits}"),
           numpy_helper.from_array(np.ascontiguousarray(blocks.d.reshape(-1), np.float32), base + ".scales")]
    pos = list(g.node).index(node)
    out = y if blocks.m is None else y + ".blocks"
    nodes = [helper.make_node("MatMulNBits", [x, new[0].name, new[1].name], [out], name=out + "/MatMulNBits",
                              domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK,
                              accuracy_level=accuracy_level)]
    if blocks.m is not None:
        # d*q + m == d*(q - 8) + (m + 8d): MatMulNBits' default zero point 8, plus the
        # per-block offsets times the input's per-block sums.
        offsets = (blocks.m + 8.0 * blocks.d).T.astype(np.float32)  # [K/32, N]
        new += [numpy_helper.from_array(np.ascontiguousarray(offsets), base + ".block_offsets"),
                numpy_helper.from_array(np.array([0, 0, nb, BLOCK], np.int64), base + ".block_shape"),
                numpy_helper.from_array(np.array([-1], np.int64), base + ".block_axis")]
        nodes += [
            helper.make_node("Reshape", [x, base + ".block_shape"], [base + ".x_blocks"], name=base + ".x_blocks/Reshape"),
            helper.make_node("ReduceSum", [base + ".x_blocks", base + ".block_axis"], [base + ".x_block_sums"],
                             name=base + ".x_block_sums/ReduceSum", keepdims=0),
            helper.make_node("MatMul", [base + ".x_block_sums", base + ".block_offsets"], [base + ".offset_term"],
                             name=base + ".offset_term/MatMul"),
            helper.make_node("Add", [out, base + ".offset_term"], [y], name=y + "/Add"),
        ]
    g.node.remove(node)
    for j, nd in enumerate(nodes):
        g.node.insert(pos + j, nd)
    g.initializer.extend(new)


def extract_embedding(model, table_path: str, block_size: int = 32, table=None) -> bool:
    """Move the token embedding out of the graph into an int8 table file.

    The graph's Gather on input_ids is replaced by an `inputs_embeds` input, and
    the table is written for engine/embedding.py, which reads only the rows of the
    tokens it needs with pread (see there for why this is not a Gather in the
    graph). Rows are quantized by onnxruntime's block quantizer, symmetric int8 in
    blocks of `block_size` along the hidden dimension, like the weights; `table`
    (int8 values [vocab, hidden], float32 scales [vocab, hidden / block]) is written
    as it is instead (a GGUF's Q8_0 embedding).
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
    if table is not None:
        values, scales = table
        hidden = values.shape[1]
        write_table(table_path, np.asarray(values, np.int8), np.asarray(scales, np.float32))
    else:
        weights = numpy_helper.to_array(inits["model.embed_tokens.weight"]).astype(np.float32)
        vocab, hidden = weights.shape
        while hidden % block_size:  # e.g. hidden 1000: blocks of 8
            block_size //= 2
        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8))
        # The quantizer works on a [K, N] MatMul weight blockwise along K; the transposed
        # table gives one row of blocks per token: uint8 [vocab, hidden / block, block]
        # holding value + 128, and float scales [vocab, hidden / block].
        packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(weights.T))
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
