"""What the edged driver and the edged side of the lookup measurement share (runs in
edged's venv; imported by bench/drivers/driver_edged.py and _lookup.edged)."""

from __future__ import annotations


def request(text: str, n: int, fmt=None):
    """A raw prompt (its tokens are exactly the ids the anchors get), greedy, no penalties."""
    from edged.engine.request import GenerateRequest

    return GenerateRequest.from_dict(
        {"prompt": text, "raw": True, "format": fmt,
         "options": {"temperature": 0, "num_predict": n, "repeat_penalty": 1.0, "top_k": 1}},
        max_prompt_chars=None)


def token_counts(gen):
    """Yield 1, 2, ... as the tokens behind a generation's text deltas arrive."""
    produced = 0
    for _delta in gen:
        while produced < len(gen.tokens):
            produced += 1
            yield produced
    while produced < len(gen.tokens):  # tail flushed after the last token
        produced += 1
        yield produced
