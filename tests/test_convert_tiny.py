"""`edged convert` on a Hugging Face folder, the CLI around the store."""

import json

from helpers import edged_cli


def test_manifest_records_everything(tiny_store):
    m = tiny_store.get("tiny")
    man = m.manifest
    assert man["source"]["kind"] == "hf"
    assert man["target"] == "x86" and man["quantization"]["scheme"] == "int8-block32"
    assert set(man["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja"}
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())
    g = man["gate"]
    assert g["status"] == "passed"
    assert g["perplexity_ratio"] <= 1.10 and g["agreement"] >= 0.80
    assert man["eos_token_ids"] and man["context_length"] == 256
    ops = {n for n in (m.path / "model.onnx").read_bytes().split(b"\x12") if b"MatMulNBits" in n}
    assert ops, "int8 graph uses MatMulNBits"


def test_cli_list_show_rm(tiny_store, tiny_hf, tmp_path):
    home = tmp_path / "home"
    r = edged_cli("convert", str(tiny_hf), "--name", "t2", home=home)
    assert r.returncode == 0, r.stderr
    assert "quality gate: passed" in r.stdout
    r = edged_cli("list", home=home)
    assert "t2" in r.stdout and "int8-block32" in r.stdout
    r = edged_cli("show", "t2", "--verify", home=home)
    assert "perplexity ratio" in r.stdout and "agreement" in r.stdout and "verified" in r.stdout
    assert json.loads(edged_cli("show", "t2", "--json", home=home).stdout)["name"] == "t2"
    r = edged_cli("run", "t2", "hello", "--temperature", "0", "--num-predict", "5", home=home)
    assert r.returncode == 0, r.stderr
    assert edged_cli("rm", "t2", home=home).returncode == 0
    r = edged_cli("show", "t2", home=home)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_bad_sources_fail_cleanly_and_install_nothing(tmp_path, tiny_hf):
    home = tmp_path / "home"
    r = edged_cli("convert", str(tmp_path / "nope"), "--name", "x", home=home)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "expected a .gguf" in r.stderr
    # an architecture the builder does not know
    bad = tmp_path / "gpt2ish"
    bad.mkdir()
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = edged_cli("convert", str(bad), "--name", "x", home=home)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert edged_cli("list", "--json", home=home).stdout.strip() == "[]"
    assert not [p for p in (home / "models").iterdir()] if (home / "models").exists() else True


def test_corrupted_model_gives_a_clear_error(tiny_store, tmp_path):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(tiny_store.get("tiny").path, home / "models" / "tiny")
    data = home / "models" / "tiny" / "model.onnx.data"
    b = bytearray(data.read_bytes())
    b[100] ^= 0x55
    data.write_bytes(bytes(b))
    r = edged_cli("run", "tiny", "hi", home=home)
    assert r.returncode == 1
    assert "corrupt" in r.stderr and "model.onnx.data" in r.stderr and "Traceback" not in r.stderr


def test_interactive_chat_keeps_history_and_leaves_on_bye(tiny_store):
    home = tiny_store.root.parent
    r = edged_cli("run", "tiny", "-v", "--temperature", "0", "--num-predict", "4", home=home, input="hello\n\nhello\n/bye\nnever sent\n")
    assert r.returncode == 0, r.stderr
    import re

    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", r.stderr)]
    assert len(prompts) == 2  # the empty line is skipped, nothing after /bye is sent
    # the second turn carries the first question and answer: history is kept
    assert prompts[1] > 2 * prompts[0] - 2
    assert "Type /bye" in r.stderr and "Traceback" not in r.stderr


def test_pull_prepares_again_when_the_store_is_stale(tiny_store):
    """`edged pull` keeps a prepared model only if it is what it would make now."""
    import copy

    from edged.models.registry import is_current

    man = copy.deepcopy(tiny_store.get("tiny").manifest)
    man["source"]["sha256"] = "a" * 64
    assert is_current(man, "a" * 64, "x86")
    assert not is_current(man, "b" * 64, "x86"), "another source file"
    assert not is_current(man, "a" * 64, "arm64"), "another target"
    old = copy.deepcopy(man)
    old["converter_version"] -= 1
    assert not is_current(old, "a" * 64, "x86"), "an older converter"
    other = copy.deepcopy(man)
    other["quantization"]["scheme"] = "int8-block64"
    assert not is_current(other, "a" * 64, "x86"), "not the target's default scheme"
    legacy = copy.deepcopy(man)
    del legacy["quantization"]
    assert not is_current(legacy, "a" * 64, "x86"), "a manifest without a quantization section"
