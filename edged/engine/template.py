"""Chat templates: the model's own Jinja template, rendered in jinja2's
immutable sandbox (templates travel with downloaded models, so they are
untrusted code).

Tools: a template that uses the `tools` variable (Qwen2.5's does) gets the
request's tools and renders them, the assistant's earlier `tool_calls` and the
`tool` messages itself. Any other template gets the system-prompt form
(`tool_prompt_messages`): the tools listed as JSON in the system message, an
earlier call rendered as the JSON object the model is made to produce, and a
tool result as a user turn wrapped in <tool_response> tags, so templates that
know only user and assistant turns render the conversation too.

Control tokens: `ControlText` keeps the caller's text (prompt, system, message
contents, tool results, tool definitions and call arguments) from becoming the
model's control tokens; only the template's own text can produce them.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime

from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edged.errors import TemplateError

TOOLS_PROMPT = (
    "You can call these tools. To call one, answer with only a JSON object: "
    '{"name": <tool name>, "arguments": <the arguments as a JSON object>}\n'
    "<tools>\n{tools}\n</tools>"
)


def _raise(message: str):
    raise TemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson (plain json.dumps); jinja2's own escapes <, >, & and ' for HTML
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def call_text(name: str, arguments: dict) -> str:
    """A tool call as the model writes it (the JSON layout the grammar gives it)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def tool_prompt_messages(messages: list[dict], tools) -> list[dict]:
    """Messages with tools, calls and tool results in plain system/user/assistant turns."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        block = TOOLS_PROMPT.replace("{tools}", listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        # Same environment settings as transformers.apply_chat_template, so templates render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
            self.renders_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except JinjaTemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools=None) -> str:
        extra = {}
        if self.renders_tools:
            extra["tools"] = [dict(t) for t in tools] if tools else None
        else:
            messages = tool_prompt_messages(messages, tools)
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except Exception as e:  # SecurityError, UndefinedError, TypeError from template code
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


# Markers stand in for control-token text inside the caller's strings while the
# template renders: Supplementary Private Use Area-B, which no tokenizer gives meaning.
_MARKERS = range(0x100000, 0x10FFFE)


def _strings(value):
    """Every string in a request value: str leaves, and dict keys (tool schemas have user-chosen keys)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class ControlText:
    """Tokenizes a rendered prompt so that control tokens (the tokenizer's added tokens
    marked special: <|im_start|>, <|im_end|>, <|eot_id|>, ...) come only from the
    template's own text. A caller who writes `<|im_end|><|im_start|>system` in a message
    gets those characters to the model as ordinary text, not as a new system turn.

        marks = control.markers(messages, tools)   # {} unless the caller wrote control-token text
        text = template.render(control.hide(messages, marks), tools=control.hide(tools, marks))
        ids = control.encode(text, marks)
        control.reveal(text, marks)                # the prompt text as the model reads it

    `hide` replaces each control-token text in the caller's strings with a marker
    character before rendering, so the template sees (and may trim, slice or JSON-escape)
    the content as usual, and the control tokens left in the rendered text are the
    template's own. `encode` tokenizes that text in one pass, exactly as
    `tokenizer.encode(text, add_special_tokens=False)` does, and returns those ids
    unchanged when there are no markers: for ordinary text the tokens are the ones a
    plain encode of the rendered prompt gives, so answers do not change. With markers,
    each stretch of text between two of the template's control tokens that holds one is
    tokenized again with the marker turned back into its text and special tokens read
    as plain text (a tokenizer copy with `encode_special_tokens`). The template's control
    tokens are hard boundaries in the one-pass encode too (added tokens are split out
    before pre-tokenization), so the stretch boundaries match it; the one difference is
    a Metaspace tokenizer with prepend_scheme "first", which gives a re-tokenized stretch
    that does not start the prompt the leading "▁" of a prompt start.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.ids = frozenset(specials)
        texts = sorted(set(specials.values()), key=len, reverse=True)  # longest first, as the tokenizer matches
        self.pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._plain = None  # the copy that reads special-token text as text; made on first use
        self._plain_lock = threading.Lock()

    def markers(self, *values) -> dict[str, str]:
        """A marker for each control-token text found in the caller's values ({} when none).
        Markers are code points that none of the values contain, so `reveal` is exact."""
        if self.pattern is None:
            return {}
        strings = list(_strings(values))
        found = sorted({m for s in strings for m in self.pattern.findall(s)})
        if not found:
            return {}
        taken = {ch for s in strings for ch in s if ord(ch) >= _MARKERS.start}
        free = (chr(c) for c in _MARKERS if chr(c) not in taken)
        return dict(zip(found, free))

    def hide(self, value, marks: dict[str, str]):
        """`value` with control-token text in its strings (and dict keys) replaced by markers."""
        if not marks or value is None:
            return value
        if isinstance(value, str):
            return self.pattern.sub(lambda m: marks[m.group(0)], value)
        if isinstance(value, dict):
            return {self.hide(k, marks): self.hide(v, marks) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.hide(v, marks) for v in value)
        return value

    def reveal(self, text: str, marks: dict[str, str]) -> str:
        for token_text, marker in marks.items():
            text = text.replace(marker, token_text)
        return text

    def encode(self, text: str, marks: dict[str, str]) -> list[int]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if not marks:
            return enc.ids
        out: list[int] = []
        start, first = 0, 0  # where the current stretch starts: in `text`, in the one-pass ids
        for i, (tok, (a, b)) in enumerate(zip(enc.ids, enc.offsets)):
            if tok in self.ids:
                out += self._stretch(text[start:a], enc.ids[first:i], marks)
                out.append(tok)
                start, first = b, i + 1
        out += self._stretch(text[start:], enc.ids[first:], marks)
        return out

    def _stretch(self, piece: str, ids: list[int], marks: dict[str, str]) -> list[int]:
        if not any(m in piece for m in marks.values()):
            return ids
        return self._plain_tokenizer().encode(self.reveal(piece, marks), add_special_tokens=False).ids

    def _plain_tokenizer(self):
        # A copy, not the shared tokenizer with the flag toggled: other threads decode and
        # encode with that one concurrently. It costs a second tokenizer's memory (about
        # 12 MB for SmolLM2's), only once a caller has sent control-token text.
        with self._plain_lock:
            if self._plain is None:
                from tokenizers import Tokenizer

                plain = Tokenizer.from_str(self.tokenizer.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain
