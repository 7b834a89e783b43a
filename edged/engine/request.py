"""The generation request: one model for the CLI, the Unix socket and MQTT.

Field and option names follow Ollama's API where they overlap, so the same JSON
works everywhere. Validation names the offending field; nothing here touches the
model, so transports can reject bad input before it reaches the queue.
"""

from __future__ import annotations

import json
import re
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from edged.errors import RequestError

@dataclass(frozen=True, kw_only=True)
class Options:
    """Sampling and limits. The defaults are Ollama's; a model's recommended settings
    (its manifest's generation_defaults) and then the request's options go over them."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    num_predict: int = -1  # -1: until EOS or the context is full
    num_ctx: int | None = None  # None: the model's context length
    stop: tuple[str, ...] = ()
    truncate: bool = False  # drop the oldest prompt tokens instead of failing

    @classmethod
    def from_dict(cls, data: dict | None, *, base: "Options | None" = None) -> "Options":
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, dict):
            raise RequestError("'options' must be an object")
        known = {f.name for f in fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise RequestError(f"unknown option {key!r}", field=f"options.{key}")
            changes[key] = _check_option(key, value)
        return replace(base, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stop"] = list(self.stop)
        return d


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_option(key: str, value: Any) -> Any:
    def bad(expect: str) -> RequestError:
        return RequestError(f"option {key!r} must be {expect}, got {value!r}", field=f"options.{key}")

    if key == "temperature":
        if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 100:
            raise bad("a number from 0 to 100")
        return float(value)
    if key == "repeat_penalty":
        if not _is_number(value) or not math.isfinite(value) or not 0.001 <= value <= 100:
            raise bad("a number from 0.001 to 100")
        return float(value)
    if key in ("top_p", "min_p"):
        if not _is_number(value) or not 0 <= value <= 1:
            raise bad("a number between 0 and 1")
        return float(value)
    if key in ("top_k", "repeat_last_n"):
        if not _is_int(value) or value < 0:
            raise bad("an integer >= 0")
        return value
    if key == "num_predict":
        if not _is_int(value) or value < -1 or value == 0:
            raise bad("a positive integer or -1")
        return value
    if key == "num_ctx":
        if value is not None and (not _is_int(value) or value < 1):
            raise bad("a positive integer")
        return value
    if key == "seed":
        if value is not None and (not _is_int(value) or value < 0):
            raise bad("an integer >= 0")
        return value
    if key == "stop":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise bad("a list of non-empty strings")
        if len(value) > 16:
            raise bad("at most 16 strings")
        return tuple(value)
    if key == "truncate":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    raise RequestError(f"unknown option {key!r}")  # pragma: no cover - guarded by caller


ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """What to generate. Exactly one of `prompt` or `messages`."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    system: str | None = None
    raw: bool = False
    options: dict = field(default_factory=dict)  # validated overrides, applied over model defaults
    format: str | dict | None = None  # "json" or a JSON schema the answer must follow
    tools: tuple[dict, ...] | None = None  # Ollama's tool list, normalized (chat only)

    @classmethod
    def from_dict(cls, data: dict, *, max_prompt_chars: int | None = None) -> "GenerateRequest":
        if not isinstance(data, dict):
            raise RequestError("request must be a JSON object")
        prompt, messages = data.get("prompt"), data.get("messages")
        if prompt is not None and messages is not None:
            raise RequestError("give either 'prompt' or 'messages', not both")
        if prompt is None and messages is None:
            raise RequestError("missing 'prompt' (or 'messages' for chat)", field="prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", field="prompt")
        msgs = None
        if messages is not None:
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list", field="messages")
            checked = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict):
                    raise RequestError(f"messages[{i}] must be an object", field=f"messages[{i}]")
                role, content = m.get("role"), m.get("content")
                if role not in ROLES:
                    raise RequestError(
                        f"messages[{i}].role must be one of {', '.join(ROLES)}", field=f"messages[{i}].role"
                    )
                calls = _tool_calls(m.get("tool_calls"), i) if role == "assistant" else None
                if content is None and calls:
                    content = ""  # an assistant turn that only called tools
                if not isinstance(content, str):
                    raise RequestError(f"messages[{i}].content must be a string", field=f"messages[{i}].content")
                msg = {"role": role, "content": content}
                if calls:
                    msg["tool_calls"] = calls
                if role == "tool" and m.get("tool_name") is not None:
                    if not isinstance(m["tool_name"], str):
                        raise RequestError(f"messages[{i}].tool_name must be a string", field=f"messages[{i}].tool_name")
                    msg["tool_name"] = m["tool_name"]
                checked.append(msg)
            msgs = tuple(checked)
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise RequestError("'system' must be a string", field="system")
        raw = data.get("raw", False)
        if not isinstance(raw, bool):
            raise RequestError("'raw' must be true or false", field="raw")
        if raw and msgs is not None:
            raise RequestError("'raw' applies to 'prompt' only", field="raw")
        opts = data.get("options")
        Options.from_dict(opts)  # validate now, apply over the model's defaults later
        fmt = _format(data.get("format"))
        tools = _tools(data.get("tools"))
        if tools is not None and msgs is None:
            raise RequestError("'tools' needs a chat request ('messages')", field="tools")
        if max_prompt_chars is not None:
            size = len(prompt or "") + len(system or "") + sum(len(m["content"]) for m in msgs or ())
            if tools:
                size += len(json.dumps(tools))  # they go into the prompt
            if size > max_prompt_chars:
                raise RequestError(
                    f"prompt too large: {size} characters, limit {max_prompt_chars}", field="prompt"
                )
        return cls(
            prompt=prompt, messages=msgs, system=system, raw=raw, options=dict(opts or {}), format=fmt, tools=tools
        )

    @property
    def forces_tool_call(self) -> bool:
        """With `tools`, the answer must be a tool call unless it follows a tool result: a
        small model asked to choose mostly never calls, so the turn that should call is
        forced; after a `tool` message the model answers in text (or in `format`)."""
        return bool(self.tools) and self.messages is not None and self.messages[-1]["role"] != "tool"


MAX_TOOLS = 64
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _format(value: Any) -> str | dict | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema; "" or null: none."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if not isinstance(value, dict):
        raise RequestError("'format' must be \"json\" or a JSON schema object", field="format")
    from edged.engine.constrain import check_schema

    check_schema(value, field="format")
    return value


def _tools(value: Any) -> tuple[dict, ...] | None:
    """Ollama's `tools`: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RequestError("'tools' must be a non-empty list", field="tools")
    if len(value) > MAX_TOOLS:
        raise RequestError(f"'tools' holds {len(value)} tools; the limit is {MAX_TOOLS}", field="tools")
    from edged.engine.constrain import check_schema, tool_call_schema

    out, names = [], set()
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
            raise RequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", field=where)
        if t.get("type", "function") != "function":
            raise RequestError(f"{where}.type must be \"function\"", field=f"{where}.type")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise RequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'", field=f"{where}.function.name")
        if name in names:
            raise RequestError(f"{where}.function.name {name!r} is given twice", field=f"{where}.function.name")
        names.add(name)
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise RequestError(f"{where}.function.description must be a string", field=f"{where}.function.description")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise RequestError(
                f"{where}.function.parameters must be a JSON schema of type object", field=f"{where}.function.parameters"
            )
        check_schema(params, field=f"{where}.function.parameters")
        fn = {"name": name, "description": desc, "parameters": params} if desc else {"name": name, "parameters": params}
        out.append({"type": "function", "function": fn})
    check_schema(tool_call_schema(out), field="tools")
    return tuple(out)


def _tool_calls(value: Any, i: int) -> tuple[dict, ...] | None:
    """An assistant message's earlier calls, Ollama's shape: [{"function": {"name", "arguments": {...}}}]."""
    if value is None:
        return None
    where = f"messages[{i}].tool_calls"
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a list", field=where)
    out = []
    for j, c in enumerate(value):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise RequestError(f"{where}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}", field=f"{where}[{j}]")
        args = f.get("arguments", {})
        if isinstance(args, str):  # OpenAI's clients send the arguments as JSON text
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise RequestError(f"{where}[{j}].function.arguments must be an object", field=f"{where}[{j}].function.arguments")
        out.append({"function": {"name": f["name"], "arguments": args}})
    return tuple(out)
