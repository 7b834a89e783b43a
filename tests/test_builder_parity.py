"""The fused graph computes what transformers computes, for every architecture
the builder accepts (tiny random models, fp32, prefill then decode steps)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edged.engine.runner import EngineConfig, GraphInfo, Runner  # noqa: E402
from edged.models.builder import DecoderSpec, build_decoder, save_model  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)


def tiny(kind):
    t = transformers
    if kind == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**COMMON, rope_theta=10000.0))
    if kind == "llama3-rope":
        return t.LlamaForCausalLM(t.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}))
    if kind == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**COMMON, sliding_window=None))
    if kind == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**COMMON, tie_word_embeddings=True))
    if kind == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**COMMON, pad_token_id=0))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "mistral", "qwen2", "phi3"])
def test_fused_graph_matches_transformers(kind, tmp_path):
    _check_parity(kind, tmp_path, EngineConfig(threads=1))


def test_lm_head_in_column_blocks_and_prompt_in_chunks(tmp_path, monkeypatch):
    # 97-token vocabulary in blocks of 32: four MatMuls of uneven width joined by a Concat;
    # a 7-token prompt fed 3 tokens per run: three prefill runs.
    from edged.models import builder

    monkeypatch.setattr(builder, "LM_HEAD_BLOCK", 32)
    _check_parity("qwen2", tmp_path, EngineConfig(threads=1, prefill_chunk=3))
    import onnx

    nodes = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.node
    assert len([n for n in nodes if n.op_type == "MatMul" and n.output[0].startswith("lm_head.")]) == 4
    assert nodes[-1].op_type == "Concat" and nodes[-1].output[0] == "logits"


def _check_parity(kind, tmp_path, config):
    torch.manual_seed(0)
    model = tiny(kind).eval()
    if kind == "qwen2":  # random biases, so the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    spec = DecoderSpec.from_hf_config(model.config.to_dict())
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "m.onnx"
    save_model(build_decoder(spec, weights), str(path))
    runner = Runner(str(path), GraphInfo(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                                         head_dim=spec.head_dim, vocab_size=spec.vocab_size), config)
    prompt = [5, 17, 42, 8, 91, 3, 60]
    steps = [11, 29, 70]
    seq = runner.sequence(len(prompt) + len(steps))
    ours = [seq.forward(prompt).copy()] + [seq.forward([t]).copy() for t in steps]
    with torch.no_grad():
        ids = torch.tensor([prompt + steps])
        ref = model(ids).logits[0].numpy()
    theirs = [ref[len(prompt) - 1]] + [ref[len(prompt) + i] for i in range(len(steps))]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3)
