"""The 4-bit scheme (int4-block32): conversion behind the quality gate, and a GGUF's
Q4_0 / Q4_1 / Q8_0 blocks carried into MatMulNBits unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import edged_cli


def _write_gguf(path, tensors: dict, arch: str = "llama") -> None:
    """tensors: GGUF name -> (fp32 [N, K], quant type name): quantized by gguf's own numpy code."""
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), arch)
    for name, (data, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    rng = np.random.default_rng(1)
    # ffn_down: Q4_1 with offsets far from zero, so a lost m term could not pass unnoticed
    tensors = {
        "blk.0.ffn_down.weight": (rng.normal(0.3, 0.05, (48, 96)).astype(np.float32), "Q4_1"),
        "blk.0.ffn_up.weight": (rng.normal(0, 0.05, (96, 64)).astype(np.float32), "Q4_0"),
        "blk.0.attn_q.weight": (rng.normal(0, 0.05, (64, 64)).astype(np.float32), "Q4_1"),
        "token_embd.weight": (rng.normal(0, 0.05, (80, 64)).astype(np.float32), "Q8_0"),
    }
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    _write_gguf(path, tensors)
    return path


def _gguf_dequantized(path) -> dict[str, np.ndarray]:
    """gguf's own dequantization: the reference for the block reader."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: dequantize(np.asarray(t.data), t.tensor_type) for t in GGUFReader(str(path)).tensors}


def test_block_reader_matches_gguf_and_transformers(small_gguf):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from edged.models.gguf_blocks import read_blocks

    ref = _gguf_dequantized(small_gguf)
    blocks = read_blocks(small_gguf, num_heads=4, num_kv_heads=2)
    down = blocks["model.layers.0.mlp.down_proj.weight"]
    assert down.kind == "Q4_1" and down.shape == (48, 96) and down.q.max() <= 15
    assert np.array_equal(down.dequantize(), ref["blk.0.ffn_down.weight"])
    assert np.array_equal(blocks["model.layers.0.mlp.up_proj.weight"].dequantize(), ref["blk.0.ffn_up.weight"])
    assert np.array_equal(blocks["model.embed_tokens.weight"].dequantize(), ref["token_embd.weight"])
    # Q rows un-permuted exactly as transformers' GGUF loader does it
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    want = proc.process(ref["blk.0.attn_q.weight"], "blk.0.attn_q.weight").weights
    assert np.array_equal(blocks["model.layers.0.self_attn.q_proj.weight"].dequantize(), want)


def _matmul_graph(weights: dict[str, np.ndarray]):
    """x [1, S, K] -> one MatMul per weight (builder naming: NAME.weight_T, [K, N])."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, inputs, outputs = [], [], [], []
    for i, (name, w) in enumerate(weights.items()):
        k, n = w.shape
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, "s", k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "s", n]))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w), name + ".weight_T"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", name + ".weight_T"], [f"y{i}"], name=f"y{i}/MatMul"))
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("accuracy_level", [4, 1])
def test_matmulnbits_computes_with_the_source_weights(small_gguf, accuracy_level):
    import onnxruntime as ort

    from edged.models.gguf_blocks import read_blocks
    from edged.models.quantize import _carry_blocks

    blocks = read_blocks(small_gguf, num_heads=4, num_kv_heads=2)
    names = {"model.layers.0.mlp.down_proj": "model.layers.0.mlp.down_proj.weight",
             "model.layers.0.self_attn.o_proj": None,  # not in the file: stays a MatMul
             "lm_head": "model.embed_tokens.weight"}  # tied head from the Q8_0 embedding
    dense = {"model.layers.0.mlp.down_proj": blocks["model.layers.0.mlp.down_proj.weight"].dequantize().T,
             "model.layers.0.self_attn.o_proj": np.eye(64, dtype=np.float32),
             "lm_head": blocks["model.embed_tokens.weight"].dequantize().T}
    model = _matmul_graph(dense)
    report = _carry_blocks(model, blocks, num_layers=1, tied=True, accuracy_level=accuracy_level)
    assert report["matmuls"] == {"Q4_1": 1, "Q8_0": 1} and report["requantized"] == []
    assert report["max_abs_diff_vs_fp32"] == 0.0
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and "model.layers.0.mlp.down_proj.weight_T" not in {
        i.name for i in model.graph.initializer}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # One-hot rows pick out single weight rows: exact even when activations are int8 (level 4)
    feed = {f"x{i}": np.eye(w.shape[0], dtype=np.float32)[None] for i, w in enumerate(dense.values())}
    outs = sess.run(None, feed)
    for (name, w), y in zip(dense.items(), outs):
        np.testing.assert_allclose(y[0], w, rtol=1e-6, atol=1e-7, err_msg=name)
    if accuracy_level == 1:  # fp32 activations: any input gives x @ W of the source weights
        rng = np.random.default_rng(2)
        feed = {f"x{i}": rng.normal(size=(1, 5, w.shape[0])).astype(np.float32) for i, w in enumerate(dense.values())}
        for (name, w), y, x in zip(dense.items(), sess.run(None, feed), feed.values()):
            np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-5, err_msg=name)


def _graph_ops(model_dir) -> list:
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return [(n.op_type, {a.name: a.i for a in n.attribute if a.name == "bits"}.get("bits"), n.input[1] if len(n.input) > 1 else "")
            for n in m.graph.node]


def _tiny_gguf(hf_folder, path):
    """The tiny Hugging Face Llama written as a GGUF the way llama.cpp stores a Q4_1 model:
    layer weights Q4_1 (Q/K rows permuted as llama.cpp's converter does), embedding and
    output Q8_0, norms F32, the tokenizer as a "gpt2" BPE."""
    import json

    import gguf
    import torch
    from gguf.quants import quantize
    from transformers import AutoModelForCausalLM

    cfg = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf row order for Q and K
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, s) for s, i in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    from tinymodel import CHAT_TEMPLATE

    w.add_chat_template(CHAT_TEMPLATE)

    def put(name, arr, kind):
        if kind == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"], "Q8_0")
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], "F32")
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "F32")
        put(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads), "Q4_1")
        put(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv_heads), "Q4_1")
        for gname, hname in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            put(f"blk.{i}.{gname}.weight", sd[p + hname + ".weight"], "Q4_1")
    put("output_norm.weight", sd["model.norm.weight"], "F32")
    put("output.weight", sd["lm_head.weight"], "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_int4_from_a_q4_1_gguf_keeps_its_blocks_and_passes_the_gate(tiny_hf, tmp_path):
    from edged.models.convert import convert
    from edged.models.store import ModelStore

    src = _tiny_gguf(tiny_hf, tmp_path / "tiny.Q4_1.gguf")
    model = convert(src, "tiny4", scheme="int4-block32", store=ModelStore(tmp_path / "models"))
    q = model.manifest["quantization"]
    assert q["scheme"] == "int4-block32" and q["precision"] == "int4" and q["smoothquant_alpha"] is None
    # every layer MatMul from the file's Q4_1 blocks, the head from its Q8_0 blocks, unchanged
    assert q["source_blocks"]["matmuls"] == {"Q4_1": 8, "Q8_0": 1}
    assert q["source_blocks"]["requantized"] == [] and q["source_blocks"]["max_abs_diff_vs_fp32"] == 0.0
    assert q["source_blocks"]["embedding"] == "Q8_0 blocks copied"
    g = model.manifest["gate"]
    assert g["status"] == "passed" and g["perplexity_ratio"] <= 1.10 and g["agreement"] >= 0.80, g
    ops = _graph_ops(model.path)
    assert sum(1 for op, bits, _ in ops if op == "MatMulNBits" and bits == 4) == 8
    assert sum(1 for op, bits, _ in ops if op == "MatMulNBits" and bits == 8) == 1
    assert all(b.endswith(".block_offsets") for op, _, b in ops if op == "MatMul")  # only the Q4_1 offset terms
    r = edged_cli("run", "tiny4", "hello", "--temperature", "0", "--num-predict", "5", home=tmp_path)
    assert r.returncode == 0, r.stderr


def test_too_lossy_int4_is_refused_with_a_clear_message(tiny_hf, tiny_store, tmp_path):
    """The tiny model's random fp32 weights are what 4 bits cannot hold (agreement ~0.3);
    the default int8 of the same folder passed (tiny_store)."""
    assert tiny_store.get("tiny").manifest["gate"]["status"] == "passed"
    home = tmp_path / "home"
    r = edged_cli("convert", str(tiny_hf), "--name", "lossy", "--scheme", "int4-block32", home=home)
    assert r.returncode == 1
    from edged.models.quantize import host_target

    assert f"quality gate refused 'lossy' (int4-block32 for {host_target()})" in r.stderr
    assert "greedy-token agreement" in r.stderr and "< 0.80" in r.stderr
    assert "int4-block32 loses too much for this model: the default int8-block32 keeps more" in r.stderr
    assert "Traceback" not in r.stderr
    assert "lossy" not in edged_cli("list", home=home).stdout  # nothing installed


def test_pull_keeps_a_model_only_in_the_asked_scheme():
    from edged.models.convert import CONVERTER_VERSION
    from edged.models.registry import is_current

    man = {"source": {"sha256": "x"}, "target": "x86", "converter_version": CONVERTER_VERSION,
           "quantization": {"scheme": "int4-block32"}}
    assert is_current(man, "x", "x86", "int4-block32")
    assert not is_current(man, "x", "x86")  # a plain pull wants the default int8 again
    assert not is_current({**man, "quantization": {"scheme": "int8-block32"}}, "x", "x86", "int4-block32")


def test_bench_int4_ratios_pair_rounds_and_fall_back_to_the_run_apart():
    from bench import int4

    def run(tps, rss):
        return {"prompts": {"short": {"decode_tps": tps, "ttft_s": 1.0}, "long": {"decode_tps": tps / 2, "ttft_s": 2.0}},
                "peak_rss_single_bytes": rss, "peak_rss_bytes": rss}

    runs = {"edged": [run(100, 300e6), run(50, 300e6)], "edged_int4": [run(140, 250e6), run(70, 250e6)],
            "llamacpp_q4_1": [run(200, 200e6), run(35, 200e6)]}
    results = {"runs": {}, "config": {}, "int4_run": {"config": {"prompt_tokens": {"short": 40, "long": 400}},
                                                      "runs": runs, "date": "d"}}
    int4.derive(results)
    assert results["int4_decode_ratio_vs_int8"] == pytest.approx(1.4)
    assert results["int4_decode_ratio_vs_llamacpp_q4_1"] == pytest.approx((0.7 + 2.0) / 2)  # same-round pairs
    assert results["int4_rss_ratio_vs_llamacpp_q4_1"] == pytest.approx(1.25)
    assert results["int4_ratios"]["measured_by"] == "python -m bench.int4"
    text = "\n".join(int4.markdown(results))
    assert "int4_rss_ratio_vs_llamacpp_q4_1` 1.25: missed" in text
    # fastest rounds: int4 140/100 vs int8, but 140/200 vs llama.cpp: the paired 1.35 alone is not "met"
    assert "int4_decode_ratio_vs_int8` paired 1.40, fastest rounds 1.40: met" in text
    assert "int4_decode_ratio_vs_llamacpp_q4_1` paired 1.35, fastest rounds 0.70: missed" in text
