"""Ollama's HTTP API and OpenAI's chat API (docs/protocol.md, "HTTP").

Clients written for Ollama (its own Python and JavaScript libraries, Home
Assistant, Open WebUI, LangChain, n8n) and for OpenAI's chat API work unchanged.
Each HTTP request is translated into edged's request JSON and handed to
`Server.receive` with a `Peer` of its own; that peer turns edged's frames into
Ollama's NDJSON lines, OpenAI's server-sent events or one JSON body. Nothing
here reaches past `Server.receive`, `cancel_all`, `status` and `models`.

Endpoints: POST /api/generate, /api/chat, /api/show; GET /api/tags, /api/ps,
/api/version, / (and HEAD); POST /v1/chat/completions; GET /v1/models[/{id}].
Ollama's model-management endpoints (pull, push, create, copy, delete, embed)
answer 501: models are prepared with `edged pull` / `edged convert`.

Listeners: TCP (127.0.0.1:11434 by default) and HTTP over a Unix socket that
takes the JSON Lines socket's mode, owner, group and peer allowlist. On TCP:
the Host header must name a loopback host unless `allow_remote` is set (a web
page cannot reach the API through DNS rebinding); a browser's Origin must be a
loopback one or listed in `http.origins`; with a token every request must carry
`Authorization: Bearer <token>`. A non-loopback address needs `allow_remote`
and a token, or the daemon refuses to start.

Limits: a request body is read up to `max_request_bytes` (413 past that, while
reading) within `http.body_timeout` (408); a keep-alive connection waits
`http.idle_timeout` for its next request's headers; a client that takes no
reply chunk for `http.write_timeout` is cut off; each listener holds at most
`http.max_connections` connections (more get 503). A client that disconnects
cancels its request: the worker stops at the next token.

Requesters: each HTTP request is its own scope (its cancel, its id space); a
connection is the requester the per-requester limits count, as on the JSON
Lines socket (concurrent requests from one client use separate connections).

Why aiohttp: one pure-asyncio dependency that runs inside the daemon's own event
loop (no second server process or thread, unlike uvicorn), with a C HTTP parser,
a low-level server that leaves routing to us, cancellation of a handler whose
client went away, and wheels for aarch64. It adds about 12 MB RSS (most of it
the package's import) and 3.2 MB of aarch64 wheels (docs/protocol.md has the
measurements); it is imported only when this transport starts, so a daemon with
HTTP off does not carry it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import secrets
import socket
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edged import __version__, protocol
from edged.errors import (
    Busy,
    Cancelled,
    DeadlineExceeded,
    EdgedError,
    IdleTimeout,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
    RequestError,
    ShuttingDown,
    Unavailable,
)
from edged.transports import Transport
from edged.transports.unix import bind_socket, peer_credentials, peer_groups

log = logging.getLogger("edged.http")

# The Ollama release whose API this matches: clients gate features (structured
# outputs, tools) on /api/version. edged's own version is reported beside it.
OLLAMA_API_VERSION = "0.6.0"
LINGER = 2.0  # seconds an answered request's unread body is still read (so the client sees the answer) before closing

# Ollama options that set up hardware or the runner, not the answer: accepted and
# ignored, as Ollama ignores the ones its runner does not use.
_RUNNER_OPTIONS = {
    "num_gpu", "main_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock", "numa", "low_vram",
    "f16_kv", "vocab_only", "logits_all", "embedding_only", "num_keep", "penalize_newline",
}  # fmt: skip
# Ollama sampling options edged does not implement: ignored at their neutral value
# (clients send those as defaults), refused otherwise.
_NEUTRAL_OPTIONS = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
_MIROSTAT_ONLY = {"mirostat_tau", "mirostat_eta"}
# Ollama endpoints edged leaves to its command line.
_MANAGEMENT = {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/embed", "/api/embeddings"}
_FINISH = {"stop": "stop", "length": "length", "deadline": "length"}  # edged done_reason -> OpenAI finish_reason


def _web():
    from aiohttp import web  # noqa: PLC0415 - see the module docstring: only when the transport starts

    return web


class HttpError(Exception):
    """An answer with an HTTP error status, in the calling API's error shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_ms: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_ms = retry_after_ms
        self.headers = headers or {}

    @classmethod
    def of(cls, err: dict) -> "HttpError":
        """From an edged error frame's `error` object."""
        code = err.get("code", "internal_error")
        return cls(status_for(code), err.get("message", "error"), code=code, param=err.get("field"),
                   retry_after_ms=err.get("retry_after_ms"))

    @classmethod
    def from_exc(cls, e: EdgedError) -> "HttpError":
        return cls.of(e.to_dict())


def _error_classes(cls=EdgedError) -> dict[str, type]:
    out = {cls.code: cls}
    for sub in cls.__subclasses__():
        out.update(_error_classes(sub))
    return out


def status_for(code: str) -> int:
    """The HTTP status for an edged error code, by its class (so a new RequestError is a 400)."""
    cls = _error_classes().get(code, EdgedError)
    for kind, status in ((PayloadTooLarge, 413), (ModelNotFound, 404), (PermissionDenied, 403),
                         (IdleTimeout, 408), (RequestError, 400),
                         (Busy, 503), (Unavailable, 503), (ShuttingDown, 503), (DeadlineExceeded, 503), (Cancelled, 503)):
        if issubclass(cls, kind):
            return status
    return 500


def _openai_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 500: "server_error",
            503: "server_error"}.get(status, "invalid_request_error")


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _is_loopback_host(host: str) -> bool:
    """Whether a Host header (or URL host) names this machine's loopback interface."""
    h = host.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    h = h.rstrip(".")
    if h in ("localhost", "0.0.0.0") or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# -- the transport -------------------------------------------------------------------


class HttpTransport(Transport):
    name = "http"

    def __init__(self, server):
        super().__init__(server)
        self._listeners: list[tuple[str, Any, Any]] = []  # (kind, asyncio server, aiohttp server)
        self._token: bytes | None = None
        self._requests = itertools.count(1)
        self._active = 0  # generations in progress
        self._refused = 0
        self.tcp_address: str | None = None
        self.unix_path: str | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self._token = self._read_token()
        if cfg.host is not None:
            self._check_tcp_policy(cfg.host)
        web = _web()
        loop = asyncio.get_running_loop()
        # The body is read (and capped) by read_json, not by aiohttp's request.read().
        kw = dict(handler_cancellation=True, keepalive_timeout=cfg.idle_timeout, lingering_time=LINGER, access_log=None)
        try:
            if cfg.host is not None:
                srv = web.Server(lambda r: self._handle(r, "tcp"), **kw)
                try:
                    lsn = await loop.create_server(self._factory(srv), cfg.host, cfg.port, backlog=128, reuse_address=True)
                except OSError as e:
                    raise EdgedError(f"cannot listen for HTTP on {cfg.host}:{cfg.port}: {e.strerror or e} "
                                     "(is Ollama running there? set http.port or EDGED_HTTP_PORT, or http.enabled: false)") from None
                self._listeners.append(("tcp", lsn, srv))
                addr = lsn.sockets[0].getsockname()
                self.tcp_address = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
                log.info("HTTP (Ollama and OpenAI APIs) on http://%s%s", self.tcp_address,
                         ", bearer token required" if self._token else "")
            if cfg.unix:
                srv = web.Server(lambda r: self._handle(r, "unix"), **kw)
                sock = self._bind_unix()
                lsn = await loop.create_unix_server(self._factory(srv), sock=sock, backlog=128)
                self._listeners.append(("unix", lsn, srv))
                log.info("HTTP (Ollama and OpenAI APIs) on unix:%s", self.unix_path)
        except BaseException:
            await self.stop_accepting()
            raise

    async def stop_accepting(self) -> None:
        for _, lsn, _ in self._listeners:
            lsn.close()
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None

    async def close(self) -> None:
        for _, lsn, srv in self._listeners:
            await srv.shutdown(2.0)  # open connections: their handlers are cancelled (and so their requests)
            try:
                await asyncio.wait_for(lsn.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
        self._listeners.clear()

    def reconfigure(self) -> None:
        # SIGHUP re-reads the token (rotation); origins, caps and timeouts are read on use.
        try:
            self._token = self._read_token()
        except EdgedError as e:
            log.error("keeping the HTTP token in use: %s", e.message)

    def describe(self) -> dict:
        return {"tcp": self.tcp_address, "unix": self.unix_path, "token": self._token is not None,
                "connections": sum(len(srv.connections) for _, _, srv in self._listeners), "generating": self._active}

    # -- start-up checks -----------------------------------------------------------------
    def _read_token(self) -> bytes | None:
        """http.token_file, else systemd's credential "http-token" (LoadCredential=); its first line."""
        path = self.cfg.token_file
        if path is None and os.environ.get("CREDENTIALS_DIRECTORY"):
            cred = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "http-token"
            path = str(cred) if cred.is_file() else None
        if path is None:
            return None
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise EdgedError(f"cannot read the HTTP token file {path}: {e.strerror}") from None
        token = lines[0].strip() if lines else ""
        if len(token) < 16:
            raise EdgedError(f"the HTTP token in {path} must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        try:
            if os.stat(path).st_mode & stat.S_IROTH:
                log.warning("the HTTP token file %s is readable by every user; chmod 600 it", path)
        except OSError:
            pass
        return token.encode()

    def _check_tcp_policy(self, host: str) -> None:
        if not host:
            raise EdgedError("http.host is empty (every interface); name an address, or null for no TCP listener")
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as e:
            raise EdgedError(f"http.host {host!r} does not resolve: {e}") from None
        loopback = all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
        if loopback:
            return
        if not self.cfg.allow_remote:
            raise EdgedError(f"http.host {host!r} is not a loopback address: other machines could use the model. "
                             "Set http.allow_remote: true and a token (http.token_file) to allow that, "
                             "or keep http.host: 127.0.0.1")
        if self._token is None:
            raise EdgedError(f"http.host {host!r} with http.allow_remote needs a token: set http.token_file "
                             "(or the systemd credential http-token)")

    def _bind_unix(self) -> socket.socket:
        sc = self.server.config.socket
        path = Path(self.cfg.unix_path or Path(sc.path).parent / "http.sock")
        sock = bind_socket(path, sc, what="the HTTP socket")
        self.unix_path = str(path)
        return sock

    def _factory(self, srv):
        def make():
            if len(srv.connections) >= self.cfg.max_connections:
                if self._refused == 0:
                    log.warning("HTTP connection cap reached (%d, http.max_connections); refusing", self.cfg.max_connections)
                self._refused += 1
                return _Refuse(self.server.config.retry_after_ms)
            return srv()

        return make

    # -- one request ---------------------------------------------------------------------
    async def _handle(self, request, via: str):
        web = _web()
        api = "openai" if request.path.startswith("/v1/") else "ollama"
        call = Call(self, request, api, via)
        try:
            self._admit(call)
            if request.method == "OPTIONS":
                return web.Response(status=204, headers=call.headers)
            if via == "tcp" and self._token is not None:
                self._check_token(request)
            route = _ROUTES.get(request.path)
            if route is None and request.path.startswith("/v1/models/"):
                route = _ROUTES["/v1/models/"]
            if route is None:
                if request.path in _MANAGEMENT or request.path.startswith("/api/blobs/"):
                    raise HttpError(501, f"edged does not implement {request.path}: prepare models on the daemon's "
                                         "machine with `edged pull` or `edged convert`, remove them with `edged rm`")
                raise HttpError(404, f"no such endpoint: {request.method} {request.path}")
            method, fn = route
            if request.method != method and not (method == "GET" and request.method == "HEAD"):
                raise HttpError(405, f"{request.path} takes {method}", headers={"Allow": method})
            return await fn(self, call)
        except HttpError as e:
            return call.error_response(e)
        except Exception:  # a bug: the client gets a 500 in its API's shape, the log the details
            log.exception("HTTP %s %s failed", request.method, request.path)
            return call.error_response(HttpError(500, "internal error; the daemon's log has the details",
                                                 code="internal_error"))

    def _admit(self, call: "Call") -> None:
        req = call.request
        if call.via == "unix":
            sock = req.transport.get_extra_info("socket") if req.transport is not None else None
            if sock is None or not self._peer_allowed(sock):
                raise HttpError(403, "this user is not allowed to use the socket", code="permission_denied")
            return
        if not self.cfg.allow_remote and not _is_loopback_host(req.host or "localhost"):
            raise HttpError(403, f"Host {req.host!r} is not this machine's loopback address", code="permission_denied")
        origin = req.headers.get("Origin")
        if origin is not None:
            if not self._origin_allowed(origin):
                raise HttpError(403, f"origin {origin!r} is not allowed (http.origins)", code="permission_denied")
            call.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
            if req.method == "OPTIONS":
                call.headers.update({
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": req.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"),
                    "Access-Control-Max-Age": "600",
                })  # fmt: skip

    def _peer_allowed(self, sock) -> bool:
        # The JSON Lines socket's allowlist, checked with its credential functions.
        sc = self.server.config.socket
        if sc.allow_uids is None and sc.allow_gids is None:
            return True
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            return False
        if sc.allow_uids is not None and uid in sc.allow_uids:
            return True
        if sc.allow_gids is not None and peer_groups(sock, uid, gid) & set(sc.allow_gids):
            return True
        log.warning("refused an HTTP request on the socket: peer pid=%d uid=%d gid=%d is not in the allowlist", pid, uid, gid)
        return False

    def _origin_allowed(self, origin: str) -> bool:
        scheme, _, rest = origin.partition("://")
        if scheme in ("http", "https") and _is_loopback_host(rest.split("/", 1)[0]):
            return True
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.cfg.origins)

    def _check_token(self, request) -> None:
        got = request.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self._token):
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- bodies ----------------------------------------------------------------------------
    async def read_json(self, call: "Call") -> dict:
        request = call.request
        limit = self.server.config.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, f"request body is {request.content_length} bytes, limit {limit}", code="payload_too_large")
        buf = bytearray()
        try:
            async with asyncio.timeout(self.cfg.body_timeout):
                while chunk := await request.content.readany():
                    if len(buf) + len(chunk) > limit:
                        raise HttpError(413, f"request body over {limit} bytes", code="payload_too_large",
                                        headers={"Connection": "close"})
                    buf += chunk
        except TimeoutError:
            raise HttpError(408, f"request body not received within {self.cfg.body_timeout:g} s",
                            code="body_timeout", headers={"Connection": "close"}) from None
        if not buf.strip():
            raise HttpError(400, "missing request body", code="malformed_request")
        try:
            return protocol.decode(bytes(buf), limit=limit)
        except EdgedError as e:
            raise HttpError.from_exc(e) from None

    # -- generation ---------------------------------------------------------------------
    async def generate(self, call: "Call", req: dict, out: "_Format"):
        """Hand `req` (edged's request JSON) to the server and answer from its frames."""
        web = _web()
        done = False
        resp = None
        self._active += 1
        try:
            try:
                # An id, or the scheduler could not find the request to cancel it (one per scope is enough).
                self.server.receive(_dump({**req, "id": 1}), call)
            except Exception as e:  # receive answers every request itself; this is a bug's safety net
                log.exception("HTTP request: receive failed")
                call.send(protocol.error_frame(None, e), True)
            while True:
                frame, final = await call.queue.get()
                done = done or final
                err = frame.get("error")
                if resp is None:
                    if err is not None:
                        return call.error_response(HttpError.of(err))
                    if not out.stream:
                        return web.Response(body=_dump(out.body(frame)), status=200, content_type="application/json",
                                            charset="utf-8", headers=call.headers)
                    resp = web.StreamResponse(status=200, headers={"Content-Type": out.content_type,
                                                                   "Cache-Control": "no-cache", **call.headers})
                    await resp.prepare(call.request)
                try:
                    if err is not None:
                        chunk = out.stream_error(HttpError.of(err))
                    elif final:
                        chunk = out.last(frame)
                    else:
                        chunk = out.delta(frame.get("delta", ""))
                    async with asyncio.timeout(self.cfg.write_timeout):
                        await resp.write(chunk)
                        if final:
                            await resp.write_eof()
                except (TimeoutError, ConnectionError) as e:
                    log.info("HTTP client stopped reading its answer (%s); cancelling", type(e).__name__)
                    return _cut_off(call, resp)
                except Exception:  # a bug after the status line went out: end the stream, keep the daemon
                    log.exception("HTTP %s: streaming the answer failed", call.request.path)
                    return _cut_off(call, resp)
                if final:
                    return resp
        finally:
            self._active -= 1
            if not done:  # the client went away (or stopped reading): stop its generation
                self.server.cancel_all(call.scope)

    # -- model facts --------------------------------------------------------------------
    def served(self) -> dict:
        return (self.server.models() or [{}])[0]

    def served_name(self) -> str:
        return self.served().get("name") or self.server.config.model

    def is_served(self, name: str | None) -> bool:
        return not name or name == self.served_name() or name.split(":")[0] == self.served_name()

    def model_dir(self) -> Path:
        from edged.models.store import ModelStore

        store = self.server.store
        if store is None:
            store = ModelStore(Path(self.server.config.models_dir)) if self.server.config.models_dir else ModelStore()
        return store.root / self.served_name()

    def manifest(self) -> tuple[dict, str, float]:
        """(the served model's manifest, its sha256, its mtime); empty when it cannot be read."""
        from edged.models.store import MANIFEST

        path = self.model_dir() / MANIFEST
        try:
            raw = path.read_bytes()
            return json.loads(raw), hashlib.sha256(raw).hexdigest(), path.stat().st_mtime
        except (OSError, ValueError):
            return {}, "", time.time()

    def details(self, manifest: dict) -> dict:
        arch = manifest.get("architecture", "")
        return {"parent_model": "", "format": "onnx", "family": arch, "families": [arch] if arch else None,
                "parameter_size": "", "quantization_level": self.served().get("quantization", "")}


def _cut_off(call: "Call", resp):
    """End a stream that cannot go on: the connection is dropped (the client sees a cut answer)."""
    if call.request.transport is not None:
        call.request.transport.abort()
    return resp


class _Refuse(asyncio.Protocol):
    """The answer on a connection over http.max_connections: 503 and close."""

    def __init__(self, retry_after_ms: int):
        self.retry = max(1, math.ceil(retry_after_ms / 1000))

    def connection_made(self, transport) -> None:
        body = _dump({"error": "too many connections; retry later"})
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (self.retry, len(body), body))
        transport.close()


class Call(protocol.Peer):
    """One HTTP request: the requester `Server.receive` answers, and what the handler needs."""

    def __init__(self, t: HttpTransport, request, api: str, via: str):
        self.t = t
        self.request = request
        self.api = api
        self.via = via
        self.headers: dict[str, str] = {}  # added to every response (CORS)
        self.scope = f"http:{next(t._requests)}"
        self.identity = f"http-conn:{id(request.protocol):x}"
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, frame: dict, final: bool) -> None:
        if threading.get_ident() == self._loop_thread:
            self.queue.put_nowait((frame, final))
        else:  # the worker thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (frame, final))

    def error_response(self, e: HttpError):
        web = _web()
        headers = {**self.headers, **e.headers}
        if e.status == 503:
            ms = e.retry_after_ms if e.retry_after_ms is not None else self.t.server.config.retry_after_ms
            headers["Retry-After"] = str(max(1, math.ceil(ms / 1000)))
        return web.Response(body=_dump(error_body(self.api, e)), status=e.status, content_type="application/json",
                            charset="utf-8", headers=headers)


def error_body(api: str, e: HttpError) -> dict:
    if api == "openai":
        return {"error": {"message": e.message, "type": _openai_type(e.status), "param": e.param, "code": e.code}}
    return {"error": e.message}


# -- answer formats ----------------------------------------------------------------------


class _Format:
    stream = False
    content_type = "application/x-ndjson"

    def body(self, frame: dict) -> dict:  # the whole answer (stream false)
        raise NotImplementedError

    def delta(self, text: str) -> bytes:
        raise NotImplementedError

    def last(self, frame: dict) -> bytes:  # what the final frame becomes when streaming
        raise NotImplementedError

    def stream_error(self, e: HttpError) -> bytes:
        raise NotImplementedError


_OLLAMA_STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


class _Ollama(_Format):
    """Ollama's NDJSON: one object per line, `done: false` until the last one, which has the stats."""

    def __init__(self, model: str, chat: bool, stream: bool, buffered: bool):
        self.model, self.chat, self.stream = model, chat, stream
        self.buffered = buffered  # a forced tool call: edged sends no deltas, the answer comes whole at the end

    def _head(self) -> dict:
        return {"model": self.model, "created_at": _now_rfc3339()}

    def _piece(self, text: str, calls: list | None = None) -> dict:
        if not self.chat:
            return {"response": text}
        msg = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = calls
        return {"message": msg}

    def _done(self, frame: dict, text: str, calls: list | None) -> dict:
        out = {**self._head(), **self._piece(text, calls), "done": True, "done_reason": frame.get("done_reason", "stop")}
        for key in _OLLAMA_STATS:
            if key in frame:
                out[key] = frame[key]
        return out

    @staticmethod
    def _answer(frame: dict) -> tuple[str, list | None]:
        if "message" in frame:
            return frame["message"].get("content", ""), frame["message"].get("tool_calls")
        return frame.get("response", ""), None

    def body(self, frame: dict) -> dict:
        text, calls = self._answer(frame)
        return self._done(frame, text, calls)

    def delta(self, text: str) -> bytes:
        return _dump({**self._head(), **self._piece(text), "done": False}) + b"\n"

    def last(self, frame: dict) -> bytes:
        lines = b""
        if self.buffered:  # the whole answer in one chunk before the closing one, as Ollama streams a tool call
            text, calls = self._answer(frame)
            if calls or text:
                lines = _dump({**self._head(), **self._piece("" if calls else text, calls), "done": False}) + b"\n"
        return lines + _dump(self._done(frame, "", None)) + b"\n"

    def stream_error(self, e: HttpError) -> bytes:
        return _dump({"error": e.message}) + b"\n"


class _OpenAI(_Format):
    """OpenAI's chat completion: one JSON body, or server-sent events ending in `data: [DONE]`."""

    content_type = "text/event-stream"

    def __init__(self, model: str, stream: bool, buffered: bool, include_usage: bool):
        self.model, self.stream, self.buffered, self.include_usage = model, stream, buffered, include_usage
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.first = True

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "fp_edged"}

    @staticmethod
    def _calls(calls: list | None) -> list | None:
        if not calls:
            return None
        return [{"id": "call_" + secrets.token_hex(8), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"].get("arguments", {}))}}
                for c in calls]

    @staticmethod
    def _usage(frame: dict) -> dict:
        # prompt_eval_count counts only the prompt tokens evaluated; those the prefix cache
        # supplied are OpenAI's cached_tokens, and part of prompt_tokens.
        cached = frame.get("prompt_cache_tokens", 0)
        p, c = frame.get("prompt_eval_count", 0) + cached, frame.get("eval_count", 0)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def _finish(self, frame: dict, calls) -> str:
        return "tool_calls" if calls else _FINISH.get(frame.get("done_reason", "stop"), "stop")

    def body(self, frame: dict) -> dict:
        text, calls = _Ollama._answer(frame)
        calls = self._calls(calls)
        msg: dict = {"role": "assistant", "content": None if calls else text}
        if calls:
            msg["tool_calls"] = calls
        return {**self._envelope("chat.completion"),
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": self._finish(frame, calls)}],
                "usage": self._usage(frame)}

    def _event(self, delta: dict, finish: str | None) -> bytes:
        if self.first:
            delta = {"role": "assistant", **delta}
            self.first = False
        chunk = {**self._envelope("chat.completion.chunk"),
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + _dump(chunk) + b"\n\n"

    def delta(self, text: str) -> bytes:
        return self._event({"content": text}, None)

    def last(self, frame: dict) -> bytes:
        out = b""
        text, calls = _Ollama._answer(frame)
        calls = self._calls(calls)
        if calls:
            out += self._event({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}, None)
        elif self.buffered and text:
            out += self._event({"content": text}, None)
        out += self._event({}, self._finish(frame, calls))
        if self.include_usage:
            out += b"data: " + _dump({**self._envelope("chat.completion.chunk"), "choices": [],
                                      "usage": self._usage(frame)}) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def stream_error(self, e: HttpError) -> bytes:
        return b"data: " + _dump(error_body("openai", e)) + b"\n\n"


# -- Ollama's API --------------------------------------------------------------------------


def _ollama_options(options: Any) -> Any:
    """Ollama's options as edged takes them: unset (null) ones and runner settings dropped,
    unimplemented samplers refused unless neutral; the rest edged validates (and names a typo)."""
    if not isinstance(options, dict):
        return options  # edged answers the type error
    out = {}
    mirostat = options.get("mirostat") or 0
    for key, value in options.items():
        if value is None or key in _RUNNER_OPTIONS or (key in _MIROSTAT_ONLY and not mirostat):
            continue
        if key in _NEUTRAL_OPTIONS:
            if value != _NEUTRAL_OPTIONS[key]:
                raise HttpError(400, f"option {key!r} is not supported by edged (only its neutral value "
                                     f"{_NEUTRAL_OPTIONS[key]!r})", code="invalid_request", param=f"options.{key}")
            continue
        out[key] = value
    return out


def _refuse_set(body: dict, key: str, what: str) -> None:
    """Ollama fields edged cannot honour: fine when empty or off, a 400 otherwise."""
    v = body.get(key)
    if v not in (None, False, "", [], 0):
        raise HttpError(400, f"{key!r}: {what}", code="invalid_request", param=key)


def _common(body: dict, model: str) -> dict:
    _refuse_set(body, "think", f'"{model}" does not support thinking')
    _refuse_set(body, "logprobs", "edged does not return log probabilities")
    _refuse_set(body, "top_logprobs", "edged does not return log probabilities")
    req: dict = {}
    if body.get("model"):
        req["model"] = body["model"]
    if "options" in body and body["options"] is not None:
        req["options"] = _ollama_options(body["options"])
    if body.get("format") not in (None, ""):
        req["format"] = body["format"]
    if "keep_alive" in body:
        req["keep_alive"] = body["keep_alive"]  # edged's daemon-wide keep_alive applies (docs/protocol.md)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise HttpError(400, "'stream' must be true or false", code="invalid_request", param="stream")
    req["stream"] = stream
    return req


def _check_model(t: HttpTransport, body: dict) -> str:
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise HttpError(400, "'model' must be a string", code="invalid_request", param="model")
    if not t.is_served(name):
        raise HttpError(404, f"model {name!r} not found; this daemon serves {t.served_name()!r}", code="model_not_found",
                        param="model")
    return name or t.served_name()


def _loaded_answer(call: Call, model: str, chat: bool):
    """Ollama's reply to a request with nothing to generate (clients use it to load a model)."""
    web = _web()
    piece = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    body = {"model": model, "created_at": _now_rfc3339(), **piece, "done": True, "done_reason": "load"}
    return web.Response(body=_dump(body), content_type="application/json", charset="utf-8", headers=call.headers)


async def api_generate(t: HttpTransport, call: Call):
    body = await t.read_json(call)
    model = _check_model(t, body)
    req = _common(body, model)
    _refuse_set(body, "images", "this model does not take images")
    _refuse_set(body, "suffix", "edged does not do fill-in-the-middle (suffix)")
    _refuse_set(body, "template", "edged uses the model's own chat template; send 'raw': true with a formatted prompt")
    _refuse_set(body, "context", "edged returns no 'context'; send the conversation as /api/chat messages")
    for key in ("width", "height", "steps"):
        _refuse_set(body, key, "edged does not generate images")
    prompt = body.get("prompt")
    if prompt in (None, "") and not body.get("system"):
        return _loaded_answer(call, model, chat=False)
    req.update(op="generate", prompt=prompt)
    if body.get("system"):
        req["system"] = body["system"]
    if "raw" in body:
        req["raw"] = body["raw"]
    return await t.generate(call, req, _Ollama(model, chat=False, stream=req["stream"], buffered=False))


def _ollama_messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages  # edged answers the type error
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            _refuse_set(m, "images", "this model does not take images")
            m = {k: v for k, v in m.items() if k not in ("images", "thinking")}
        out.append(m)
    return out


def _forces_tool_call(tools: Any, messages: Any) -> bool:
    # The same rule as edged's engine: with tools, the turn after a user message is a call.
    return bool(tools) and isinstance(messages, list) and bool(messages) and \
        isinstance(messages[-1], dict) and messages[-1].get("role") != "tool"


async def api_chat(t: HttpTransport, call: Call):
    body = await t.read_json(call)
    model = _check_model(t, body)
    req = _common(body, model)
    messages = body.get("messages")
    if messages in (None, []):
        return _loaded_answer(call, model, chat=True)
    req.update(op="chat", messages=_ollama_messages(messages))
    tools = body.get("tools")
    if tools:
        req["tools"] = tools
    stream = req["stream"]
    buffered = _forces_tool_call(tools, messages)
    if buffered:
        req["stream"] = False  # the call is sent whole; its JSON text is not streamed as content
    return await t.generate(call, req, _Ollama(model, chat=True, stream=stream, buffered=buffered))


def _model_entry(t: HttpTransport) -> dict:
    manifest, digest, mtime = t.manifest()
    name = f"{t.served_name()}:latest"
    return {"name": name, "model": name,
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
            "size": t.served().get("size", 0), "digest": digest, "details": t.details(manifest)}


async def api_tags(t: HttpTransport, call: Call):
    # The daemon serves one model; listing others would offer models every request for fails.
    return _json(call, {"models": [_model_entry(t)]})


async def api_ps(t: HttpTransport, call: Call):
    info = t.served()
    if not info.get("loaded"):
        return _json(call, {"models": []})
    keep = t.server.config.keep_alive
    # Ollama's "forever" (-1) is as far off as a Go duration reaches.
    expires = datetime.now(timezone.utc) + (timedelta(days=365 * 292) if keep < 0 else timedelta(seconds=keep))
    entry = _model_entry(t)
    entry.pop("modified_at")
    entry.update(expires_at=expires.isoformat(), size_vram=0, context_length=info.get("context_length"))
    return _json(call, {"models": [entry]})


async def api_show(t: HttpTransport, call: Call):
    body = await t.read_json(call)
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name:
        raise HttpError(400, "'model' is required", code="invalid_request", param="model")
    if not t.is_served(name):
        raise HttpError(404, f"model {name!r} not found; this daemon serves {t.served_name()!r}", code="model_not_found")
    manifest, _, mtime = t.manifest()
    info = t.served()
    arch = manifest.get("architecture", "llama")
    graph = manifest.get("graph", {})
    params = manifest.get("generation_defaults", {})
    template = ""
    name_of_template = manifest.get("files_by_role", {}).get("chat_template")
    if name_of_template:
        try:
            template = (t.model_dir() / name_of_template).read_text()
        except OSError:
            pass
    parameters = "\n".join(f"{k:<30} {json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items())
    model_info = {"general.architecture": arch, "general.name": t.served_name(),
                  "general.quantization": info.get("quantization"), f"{arch}.context_length": info.get("context_length")}
    for key, ollama_key in (("hidden_size", "embedding_length"), ("num_layers", "block_count"),
                            ("num_kv_heads", "attention.head_count_kv"), ("vocab_size", "vocab_size")):
        if key in graph:
            model_info[f"{arch}.{ollama_key}"] = graph[key]
    return _json(call, {
        "license": manifest.get("source", {}).get("license", ""),
        "modelfile": f"# {manifest.get('source', {}).get('description') or t.served_name()}, prepared by edged\n"
                     + "".join(f"PARAMETER {k} {v}\n" for k, v in params.items()),
        "parameters": parameters,
        "template": template,
        "details": t.details(manifest),
        "model_info": model_info,
        "capabilities": ["completion", "tools"],
        "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
    })  # fmt: skip


async def api_version(t: HttpTransport, call: Call):
    return _json(call, {"version": OLLAMA_API_VERSION, "edged": __version__})


async def root(t: HttpTransport, call: Call):
    web = _web()
    return web.Response(text=f"Ollama is running (edged {__version__})", headers=call.headers)


def _json(call: Call, obj: dict):
    web = _web()
    return web.Response(body=_dump(obj), content_type="application/json", charset="utf-8", headers=call.headers)


# -- OpenAI's API ---------------------------------------------------------------------------


def _openai_messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        raise HttpError(400, "'messages' must be a list", code="invalid_request", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role == "function":
            raise HttpError(400, f"messages[{i}]: role 'function' is not supported; use tools", code="invalid_request",
                            param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    raise HttpError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                                    code="invalid_request", param=f"messages[{i}].content")
                texts.append(part.get("text", ""))
            content = "".join(texts)
        msg: dict = {"role": role, "content": "" if content is None else content}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]  # edged takes OpenAI's JSON-text arguments too
        out.append(msg)
    return out


def _openai_tools(body: dict) -> Any:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto", "required"):
        return tools or None  # edged makes the call turn a call anyway (docs/protocol.md)
    if choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        only = [x for x in tools if isinstance(x, dict) and isinstance(x.get("function"), dict)
                and x["function"].get("name") == name]
        if not only:
            raise HttpError(400, f"tool_choice names {name!r}, which is not in 'tools'", code="invalid_request",
                            param="tool_choice")
        return only
    raise HttpError(400, "'tool_choice' must be none, auto, required or a function", code="invalid_request",
                    param="tool_choice")


async def v1_chat(t: HttpTransport, call: Call):
    body = await t.read_json(call)
    model = _check_model(t, body)
    if body.get("n") not in (None, 1):
        raise HttpError(400, "edged makes one choice per request ('n' must be 1)", code="invalid_request", param="n")
    for key in ("logprobs", "top_logprobs", "logit_bias", "audio"):
        if body.get(key):
            raise HttpError(400, f"{key!r} is not supported by edged", code="invalid_request", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise HttpError(400, f"{key!r} is not supported by edged (only 0)", code="invalid_request", param=key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, "'stream' must be true or false", code="invalid_request", param="stream")
    messages = _openai_messages(body.get("messages"))
    req: dict = {"op": "chat", "messages": messages, "stream": stream}
    if body.get("model"):
        req["model"] = body["model"]
    options: dict = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        options["num_predict"] = limit
    for key in ("temperature", "top_p", "seed"):
        if body.get(key) is not None:
            options[key] = body[key]
    if body.get("stop") is not None:
        options["stop"] = body["stop"]
    if options:
        req["options"] = options
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            req["format"] = "json"
        elif kind == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
            if not isinstance(schema, dict):
                raise HttpError(400, "response_format.json_schema.schema must be a JSON schema object",
                                code="invalid_request", param="response_format")
            req["format"] = schema
        elif kind != "text":
            raise HttpError(400, "response_format.type must be text, json_object or json_schema", code="invalid_request",
                            param="response_format")
    tools = _openai_tools(body)
    if tools:
        req["tools"] = tools
    buffered = _forces_tool_call(tools, messages)
    if buffered:
        req["stream"] = False
    so = body.get("stream_options")
    usage = isinstance(so, dict) and so.get("include_usage") is True
    return await t.generate(call, req, _OpenAI(model, stream=stream, buffered=buffered, include_usage=usage))


def _openai_model(t: HttpTransport) -> dict:
    _, _, mtime = t.manifest()
    return {"id": t.served_name(), "object": "model", "created": int(mtime), "owned_by": "edged"}


async def v1_models(t: HttpTransport, call: Call):
    return _json(call, {"object": "list", "data": [_openai_model(t)]})


async def v1_model(t: HttpTransport, call: Call):
    name = call.request.path[len("/v1/models/"):]
    if not t.is_served(name):
        raise HttpError(404, f"model {name!r} not found; this daemon serves {t.served_name()!r}", code="model_not_found",
                        param="model")
    return _json(call, _openai_model(t))


_ROUTES = {
    "/": ("GET", root),
    "/api/version": ("GET", api_version),
    "/api/tags": ("GET", api_tags),
    "/api/ps": ("GET", api_ps),
    "/api/show": ("POST", api_show),
    "/api/generate": ("POST", api_generate),
    "/api/chat": ("POST", api_chat),
    "/v1/chat/completions": ("POST", v1_chat),
    "/v1/models": ("GET", v1_models),
    "/v1/models/": ("GET", v1_model),
}
