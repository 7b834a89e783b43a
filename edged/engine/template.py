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
"""

from __future__ import annotations

import json
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

