"""Make an HF fp32 folder (weights + tokenizer) from a GGUF with transformers' GGUF loader.
Runs in the main venv (transformers + gguf): python gguf_to_hf.py MODEL.gguf OUT_DIR"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def main(src: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_p = Path(src)
    tmp = Path(out + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(src_p.parent), gguf_file=src_p.name, torch_dtype=torch.float32)
    model.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(str(src_p.parent), gguf_file=src_p.name)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
