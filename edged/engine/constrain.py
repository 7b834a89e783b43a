"""Constrained decoding: JSON answers (Ollama's `format`) and forced tool calls.

llguidance turns a JSON schema into a grammar over the model's own tokens. Each
decoding step it fills a bitmask of the tokens that keep the text a prefix of a
valid answer; the sampler sees -inf on every other token, so sampling (any
temperature, seed, top-k/top-p) can only pick tokens the grammar allows. When
the grammar admits no further token (a JSON object's closing brace), the answer
ends there as if the model had produced EOS; EOS itself is allowed only where the
text is complete.

    grammar = Constraints.of(engine).grammar(schema)   # compiled once per request
    guide = grammar.start()                            # per sequence (batch slot)
    logits = guide.mask(logits); tok = sample(logits); guide.advance(tok)
    guide.complete                                     # nothing may follow: stop

Pieces:
- `schema_for_format` / `tool_call_schema`: the schema a request's `format` or
  `tools` asks for. Objects that list `properties` and say nothing about
  `additionalProperties` get `additionalProperties: false` in the grammar (as
  llama.cpp's and so Ollama's grammars do), so a small model closes the object
  after the listed keys instead of inventing more; the output still validates
  against the caller's schema.
- `check_schema`: compile without a tokenizer, for request validation (a bad
  schema is an `invalid_request` naming the field).
- `Constraints`: the engine's llguidance tokenizer (built on first use, ~0.5 s for
  a 49k vocabulary with its check, so loading a model costs nothing when no
  request uses a grammar) and a small cache of compiled grammars (a route or a device that
  repeats its schema compiles it once).
- `tool_calls`: the final frame's `message.tool_calls` from a forced answer.

The JSON has the layout json.dumps gives it (`{"a": 1, "b": "x"}`): ", " and ": "
as separators and no other whitespace, so a small model cannot loop on spaces or
newlines. Measured on SmolLM2-135M (same prompts, greedy and seeded): with the
spaced separators it writes what it saw in training and fills strings with
content ("reason": "temperature is too high"); held to compact JSON it wrote
"reason":"false" and the like.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from edged.errors import EdgedError, RequestError

if TYPE_CHECKING:  # pragma: no cover
    from edged.engine.engine import Engine
    from edged.engine.request import GenerateRequest

# "json": any JSON object (Ollama's meaning of format "json").
ANY_OBJECT = {"type": "object"}
# Separators as json.dumps writes them and no other whitespace (see the module docstring).
_COMPILE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 64 * 1024


def schema_for_format(fmt: str | dict) -> dict:
    return ANY_OBJECT if fmt == "json" else fmt


def tool_call_schema(tools: tuple[dict, ...] | list[dict]) -> dict:
    """The schema of one forced call: {"name": <a tool's name>, "arguments": <its parameters>}."""
    alts = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def _closed(schema: Any) -> Any:
    """A copy of the schema where objects that list properties allow no others unless they say so.
    Not applied inside allOf (closing each part would reject the keys of the others)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "allOf" not in out:
        out["additionalProperties"] = False
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in ("anyOf", "oneOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) for s in out[key]]
    for key in ("$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed(v) for k, v in out[key].items()}
    return out


@functools.lru_cache(maxsize=64)
def _grammar(schema_json: str) -> tuple[str, str]:
    """(llguidance grammar, "" or the reason it does not compile) for a schema given as JSON text."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(_closed(json.loads(schema_json)), overrides=_COMPILE)
    except ValueError as e:
        return "", str(e)
    err = LLMatcher.validate_grammar(grammar)
    return grammar, err


def _key(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"))  # key order kept: it is the output order


def check_schema(schema: Any, *, field: str) -> None:
    """Raise an invalid_request naming `field` when the schema cannot be enforced."""
    if not isinstance(schema, (dict, bool)):
        raise RequestError(f"'{field}' must be a JSON schema object", field=field)
    text = _key(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise RequestError(f"'{field}' is {len(text)} characters of schema; the limit is {MAX_SCHEMA_CHARS}", field=field)
    _, err = _grammar(text)
    if err:
        first = err.strip().splitlines()[0] if err.strip() else err
        raise RequestError(f"'{field}' is not a JSON schema edged can enforce: {first}", field=field)


def request_schema(req: "GenerateRequest") -> tuple[dict, str] | None:
    """(the schema the answer to `req` must follow, the request field it comes from), or None for free text."""
    if req.forces_tool_call:
        return tool_call_schema(req.tools), "tools"
    if req.format:
        return schema_for_format(req.format), "format"
    return None


def tool_calls(req: "GenerateRequest", text: str, done_reason: str | None) -> list[dict] | None:
    """Ollama's `message.tool_calls` for a complete forced call, else None (an answer cut off
    by num_predict, a cancel or a deadline is no call: its partial text stays in `content`)."""
    if not req.forces_tool_call or done_reason != "stop":
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    names = {t["function"]["name"] for t in req.tools}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return [{"function": {"name": call["name"], "arguments": call["arguments"]}}]


def _for_llguidance(tokenizer_json: str) -> str:
    """The tokenizer.json text as llguidance should read it. llguidance takes a decoder
    Sequence holding ByteFallback for a SentencePiece-style byte-fallback vocabulary,
    even when the Sequence also holds ByteLevel (as converted GPT-2-style vocabularies,
    SmolLM2's among them, have): it would then see the byte-level stand-in characters
    ("Ċ") instead of the bytes they stand for (a newline). Such a Sequence is replaced
    by its ByteLevel step, which alone maps every token of a byte-level vocabulary."""
    data = json.loads(tokenizer_json)
    dec = data.get("decoder") or {}
    if dec.get("type") == "Sequence":
        level = [d for d in dec.get("decoders") or [] if d.get("type") == "ByteLevel"]
        if level:
            data["decoder"] = level[0]
            return json.dumps(data)
    return tokenizer_json


def _check_bytes(ll, hf) -> None:
    """Every ordinary token must mean the same bytes to llguidance as to the engine's
    detokenizer, or a masked answer could still decode to invalid JSON. Each token is
    decoded after an anchor token, so a decoder that strips a leading space (SentencePiece)
    keeps it."""
    n = hf.get_vocab_size()
    anchor = hf.encode("a", add_special_tokens=False).ids
    base = hf.decode(anchor, skip_special_tokens=False)
    texts = hf.decode_batch([anchor + [i] for i in range(n)], skip_special_tokens=False)
    differ = [
        i
        for i, t in enumerate(texts)
        if "\ufffd" not in t  # a piece of a UTF-8 character: no text of its own to compare
        and not ll.is_special_token(i)
        and (not t.startswith(base) or t[len(base) :].encode() != ll.decode_bytes([i]))
    ]
    if differ:
        raise EdgedError(
            f"format and tools are unavailable for this model: the constraint engine reads {len(differ)} "
            f"of its {n} tokens differently from the model's tokenizer (e.g. token {differ[0]})"
        )


class Grammar:
    """One compiled grammar; `start()` gives an independent matcher per sequence."""

    def __init__(self, matcher, vocab: int):
        self._pristine = matcher
        self.vocab = vocab

    def start(self) -> "Guide":
        return Guide(self._pristine.deep_copy(), self.vocab)


class GrammarFailed(Exception):
    """The matcher cannot continue (a parser limit was hit); the sequence must end."""


class Guide:
    """A sequence's position in its grammar: masks logits, follows sampled tokens."""

    def __init__(self, matcher, vocab: int):
        from llguidance.numpy import allocate_token_bitmask

        self.m = matcher
        self.bits = allocate_token_bitmask(1, vocab)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with -inf on every token the grammar does not allow next."""
        from llguidance.numpy import fill_next_token_bitmask

        if self.m.is_error():
            raise GrammarFailed(self.m.get_error())
        fill_next_token_bitmask(self.m, self.bits)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little", count=logits.shape[-1])
        if not allowed.any():
            raise GrammarFailed(self.m.get_error() or "no token is allowed")
        return np.where(allowed, logits, np.float32(-np.inf))

    def advance(self, tok: int) -> None:
        if not self.m.consume_token(tok):
            raise GrammarFailed(self.m.get_error())

    @property
    def complete(self) -> bool:
        """The text is a whole answer and nothing may follow it."""
        return self.m.is_stopped() and self.m.is_accepting()


class Constraints:
    """Per engine: the llguidance tokenizer and recently compiled grammars."""

    CACHE = 32

    def __init__(self, engine: "Engine"):
        from llguidance import LLTokenizer

        text = _for_llguidance(engine.model.file("tokenizer").read_text())
        self.vocab = int(engine.info.vocab_size)
        self.tokenizer = LLTokenizer(text, n_vocab=self.vocab, eos_token=sorted(engine.eos_ids))
        _check_bytes(self.tokenizer, engine.tokenizer)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    _init_lock = threading.Lock()

    @classmethod
    def of(cls, engine: "Engine") -> "Constraints":
        """The engine's Constraints, built on first use and kept on the engine (as is the
        refusal of a tokenizer that fails the check: it is not rebuilt per request)."""
        c = getattr(engine, "_constraints", None)
        if c is None:
            with cls._init_lock:
                c = getattr(engine, "_constraints", None)
                if c is None:
                    try:
                        c = cls(engine)
                    except EdgedError as e:
                        c = e
                    engine._constraints = c
        if isinstance(c, EdgedError):
            raise c
        return c

    def grammar(self, schema: Any, *, field: str = "format") -> Grammar:
        from llguidance import LLMatcher

        key = _key(schema)
        with self._lock:
            g = self._cache.get(key)
            if g is not None:
                self._cache.move_to_end(key)
                return g
        text, err = _grammar(key)
        if err:
            raise RequestError(f"'{field}' cannot be enforced: {err.strip().splitlines()[0]}", field=field)
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise RequestError(f"'{field}' cannot be enforced: {matcher.get_error()}", field=field)
        g = Grammar(matcher, self.vocab)
        with self._lock:
            self._cache[key] = g
            while len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        return g
