"""Chat templates: the model's own Jinja template, rendered in jinja2's
immutable sandbox (templates travel with downloaded models, so they are
untrusted code)."""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edged.errors import TemplateError


def _raise(message: str):
    raise TemplateError(f"chat template: {message}")


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        # Same environment settings as transformers.apply_chat_template, so templates render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except JinjaTemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as e:  # SecurityError, UndefinedError, TypeError from template code
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
