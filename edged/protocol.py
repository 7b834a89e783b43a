"""The wire codec shared by every transport: bytes -> validated `Frame`, and reply frames.

A request is a JSON object; field names follow Ollama's API where they overlap
(`prompt`, `system`, `messages`, `options`, `stream`, `raw`, `model`, `format`,
`tools`), so the same JSON works on every transport. Replies:

    {"id": ..., "delta": "text", "seq": n}                 # only when streaming
    {"id": ..., "done": true, "response": ..., <stats>}    # final (chat: "message", with
                                                           # "tool_calls" for a tool call)
    {"id": ..., "done": true, "error": {"code", "message", ...}}

See docs/protocol.md.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from edged.engine.request import GenerateRequest
from edged.errors import EdgedError, MalformedRequest, PayloadTooLarge, RequestError, UnknownOperation

OPS = ("generate", "chat", "cancel", "status", "models", "health")
GEN_OPS = ("generate", "chat")
MAX_ID_CHARS = 128

# Top-level fields a request may carry; anything else is an error naming the field.
# `keep_alive` is an Ollama field accepted and ignored (documented).
_FIELDS = {
    "id", "op", "prompt", "system", "messages", "options", "stream", "raw", "model",
    "priority", "timeout_ms", "reply_to", "target", "keep_alive", "format", "tools",
}  # fmt: skip


@dataclass(kw_only=True)
class Frame:
    """A validated request frame."""

    id: Any  # echoed as given (string or integer)
    op: str
    stream: bool
    priority: int = 0
    timeout_ms: int | None = None
    model: str | None = None
    target: Any = None  # cancel: the request id to cancel
    reply_to: str | None = None  # MQTT 3.1.1 clients
    gen: GenerateRequest | None = None

    @property
    def key(self) -> str:
        return str(self.id)


MAX_DEPTH = 32  # nesting a request may use; deeper JSON is refused before it is parsed


def decode(data: bytes | str, *, limit: int) -> dict:
    """bytes -> JSON object, or MalformedRequest/PayloadTooLarge."""
    if len(data) > limit:
        raise PayloadTooLarge(f"request is {len(data)} bytes, limit {limit}")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if _too_deep(data):
        raise MalformedRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise MalformedRequest("not valid JSON (UTF-8)") from None
    if _SURROGATE.search(data) and _lone_surrogate(obj):
        raise MalformedRequest("a JSON string holds a lone UTF-16 surrogate, which UTF-8 cannot carry")
    if not isinstance(obj, dict):
        raise MalformedRequest("request must be a JSON object")
    return obj


# An escaped surrogate (\ud800) or a raw one (json.loads decodes bytes with surrogatepass):
# only a request holding one of these pays for the full check.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _lone_surrogate(obj: Any) -> bool:
    # A pair (an escaped emoji) encodes; a lone half cannot, and no reply echoing it could be sent.
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _too_deep(data: bytes) -> bool:
    # Why a pre-scan: json.loads recurses per level and raises RecursionError (not
    # ValueError) on deep input. Brackets inside strings are skipped.
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return False
    depth, in_str, esc = 0, False, False
    for b in data:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif b in (0x5D, 0x7D):
            depth -= 1
    return False


def peek_id(obj: Any) -> Any:
    """The id to put on an error frame, when the request carries a usable one."""
    if isinstance(obj, dict):
        v = obj.get("id")
        if _valid_id(v):
            return v
    return None


def _valid_id(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS


def parse(obj: dict, *, default_stream: bool, default_op: str | None = None, max_prompt_chars: int | None = None) -> Frame:
    for k in obj:
        if k not in _FIELDS:
            raise RequestError(f"unknown field {k!r}", field=k)
    rid = obj.get("id")
    if rid is not None and not _valid_id(rid):
        raise RequestError(f"'id' must be a string of 1..{MAX_ID_CHARS} characters or an integer", field="id")
    op = obj.get("op", default_op)
    if op is None:
        op = "chat" if "messages" in obj else "generate"
    if not isinstance(op, str):
        raise RequestError("'op' must be a string", field="op")
    if op not in OPS:
        raise UnknownOperation(f"unknown op {op!r}; one of {', '.join(OPS)}", field="op")
    stream = obj.get("stream", default_stream)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", field="stream")
    priority = obj.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
        raise RequestError("'priority' must be an integer from -100 to 100 (higher runs first)", field="priority")
    timeout = obj.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise RequestError("'timeout_ms' must be a positive integer", field="timeout_ms")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", field="model")
    reply_to = obj.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not reply_to or any(c in reply_to for c in "+#")):
        raise RequestError("'reply_to' must be a topic name without wildcards", field="reply_to")
    f = Frame(id=rid, op=op, stream=stream, priority=priority, timeout_ms=timeout, model=model, reply_to=reply_to)
    if op in GEN_OPS:
        if op == "chat" and "messages" not in obj:
            raise RequestError("chat needs 'messages'", field="messages")
        if op == "generate" and "messages" in obj:
            raise RequestError("generate takes 'prompt'; use op 'chat' for 'messages'", field="messages")
        body = {k: obj[k] for k in ("prompt", "system", "messages", "options", "raw", "format", "tools") if k in obj}
        f.gen = GenerateRequest.from_dict(body, max_prompt_chars=max_prompt_chars)
    elif op == "cancel":
        target = obj.get("target", rid)
        if not _valid_id(target):
            raise RequestError("cancel needs 'target' (the request id to cancel)", field="target")
        f.target = target
    return f


class Peer:
    """One requester as its transport sees it. The server decodes, validates and
    dispatches; it answers only through `send`, from any thread.

    `scope` names the requester: request ids, duplicates and cancels are per scope.
    Transports override the hooks they need."""

    scope: str = ""
    identity: str = ""  # who is charged for the request (quotas); "" = the scope
    default_stream: bool = True
    default_op: str | None = None  # None: chat with `messages`, else generate
    deadline: float | None = None  # time.monotonic() after which the request must not start

    def route(self, obj: dict) -> None:
        """Learn the reply address from the decoded request (MQTT 3.1.1 `reply_to`);
        raise a RequestError when there is none."""

    def admit(self, frame: Frame) -> bool:
        """False when the transport already answered this frame (a redelivered duplicate)."""
        return True

    def send(self, frame: dict, final: bool) -> None:
        raise NotImplementedError


# -- replies -------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def delta_frame(rid: Any, text: str, seq: int) -> dict:
    # seq (1, 2, ...) lets an MQTT client drop a delta that QoS 1 delivered twice.
    return {"id": rid, "delta": text, "seq": seq}


def final_frame(rid: Any, *, model: str, text: str, stats: dict, chat: bool, tool_calls: list | None = None) -> dict:
    """`tool_calls`: a chat answer that is a tool call; its JSON text is then not repeated
    as `content` (Ollama's shape: content "" and message.tool_calls)."""
    out: dict = {"id": rid, "done": True, "model": model, "created_at": _now()}
    if chat and tool_calls:
        out["message"] = {"role": "assistant", "content": "", "tool_calls": tool_calls}
    elif chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out.update(stats)
    return out


def error_frame(rid: Any, err: EdgedError | Exception) -> dict:
    # Internal exception text (paths, library messages) stays in the log.
    if not isinstance(err, EdgedError):
        err = EdgedError("internal error; the daemon's log has the details")
    return {"id": rid, "done": True, "error": err.to_dict()}


def reply_frame(rid: Any, body: dict) -> dict:
    """Final frame for the non-generating ops (status, models, health, cancel)."""
    return {"id": rid, "done": True, **body}


def encode(frame: dict) -> bytes:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
