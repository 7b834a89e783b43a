"""The HTTP transport (Ollama's API and OpenAI's chat API) against real daemons, spoken to by
clients nobody here wrote: the official `ollama` and `openai` Python libraries and curl.

Mechanics run on the tiny model in an in-process daemon; the real answers (a capital, a
JSON object following a schema, a tool call) come from SmolLM2, in-process and as a real
`edged serve` process."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import threading
from datetime import datetime

import httpx
import jsonschema
import ollama
import openai
import pytest
from helpers import WAIT, DaemonProcess, DaemonThread, Gate, daemon_config, free_port, unix_path, wait_for

from edged.errors import EdgedError

OPTS = {"num_predict": 6, "temperature": 0, "seed": 1}
STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


@pytest.fixture
def web(start_daemon):
    """A daemon on the tiny model with the HTTP transport on a free loopback port."""

    def start(**over) -> DaemonThread:
        over.setdefault("http__port", free_port())
        return start_daemon(http__enabled=True, **over)

    return start


def http_of(d: DaemonThread):
    return next(t for t in d.server.transports if t.name == "http")


def base(d: DaemonThread) -> str:
    return f"http://{http_of(d).tcp_address}"


def raw(d: DaemonThread, method: str, path: str, body=None, headers: dict | None = None):
    """One request with the standard library's client: (status, headers, body bytes)."""
    host, port = http_of(d).tcp_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    data = json.dumps(body).encode() if isinstance(body, dict) else body  # bytes, None or an iterator (chunked)
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def curl_unix(d: DaemonThread, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(int(WAIT)), "--unix-socket", http_of(d).unix_path, *args],
                          capture_output=True, text=True, timeout=WAIT + 5)


# -- the ollama client -------------------------------------------------------------------


def test_ollama_client_generate_and_chat_streaming_and_not(web):
    d = web()
    c = ollama.Client(host=base(d))
    whole = c.generate(model="tiny", prompt="hello there", options=OPTS)
    assert whole.done is True and whole.done_reason == "length" and whole.model == "tiny"
    assert whole.eval_count == 6 and whole.prompt_eval_count > 0 and whole.total_duration > 0
    assert isinstance(whole.response, str) and whole.response

    parts = list(c.generate(model="tiny", prompt="hello there", options=OPTS, stream=True))
    assert all(p.done is False for p in parts[:-1]) and parts[-1].done is True
    assert "".join(p.response for p in parts) == whole.response  # same seed, same text
    assert parts[-1].eval_count == 6 and parts[-1].response == ""

    msgs = [{"role": "user", "content": "hi"}]
    chat = c.chat(model="tiny:latest", messages=msgs, options=OPTS)
    assert chat.message.role == "assistant" and chat.message.content and chat.done_reason == "length"
    chunks = list(c.chat(model="tiny", messages=msgs, options=OPTS, stream=True))
    assert "".join(ch.message.content for ch in chunks) == chat.message.content
    assert chunks[-1].done and chunks[-1].eval_count == 6


def test_ollama_client_list_show_ps_version(web):
    d = web()
    c = ollama.Client(host=base(d))
    models = c.list().models
    assert [m.model for m in models] == ["tiny:latest"]
    assert models[0].size > 0 and len(models[0].digest) == 64 and models[0].details.quantization_level
    shown = c.show("tiny")
    assert shown.modelinfo["llama.context_length"] == 256 and "completion" in shown.capabilities
    assert "im_start" in shown.template  # the model's own chat template
    running = c.ps().models
    assert running[0].model == "tiny:latest" and running[0].context_length == 256 and running[0].expires_at.year > 2100
    with pytest.raises(ollama.ResponseError) as e:
        c.show("llama3.2")
    assert e.value.status_code == 404
    status, headers, body = raw(d, "GET", "/api/version")
    assert status == 200 and json.loads(body)["version"]
    status, _, body = raw(d, "GET", "/")
    assert status == 200 and b"Ollama is running" in body
    assert raw(d, "HEAD", "/")[0] == 200  # the ollama CLI's heartbeat


def test_ollama_client_options(web):
    d = web()
    c = ollama.Client(host=base(d))
    short = c.generate(model="tiny", prompt="hello", options={"num_predict": 2, "temperature": 0})
    assert short.eval_count == 2
    # The client's Options type with runner settings (ignored) and neutral samplers edged lacks.
    opts = ollama.Options(num_predict=3, temperature=0.0, top_k=5, num_thread=2, num_gpu=0, mirostat=0, typical_p=1.0)
    assert c.generate(model="tiny", prompt="hello", options=opts, keep_alive="5m").eval_count == 3
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="tiny", prompt="hello", options={"temprature": 0.5})
    assert e.value.status_code == 400 and "temprature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="tiny", prompt="hello", options={"presence_penalty": 0.5})
    assert e.value.status_code == 400 and "presence_penalty" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="tiny", prompt="hello", think=True)
    assert e.value.status_code == 400 and "thinking" in e.value.error


def test_ollama_client_errors(web):
    d = web()
    c = ollama.Client(host=base(d))
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="llama3.2", prompt="hello")
    assert e.value.status_code == 404 and "llama3.2" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # streaming: the status comes before any line
        list(c.chat(model="tiny", messages=[{"role": "wizard", "content": "hi"}], stream=True))
    assert e.value.status_code == 400 and "role" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="tiny", prompt="hello", images=[b"\x89PNG"])
    assert e.value.status_code == 400
    # A request with nothing to generate loads the model, as Ollama's clients expect.
    loaded = c.generate(model="tiny")
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_client_over_the_unix_socket(web):
    d = web()
    c = ollama.Client(host="http://localhost", transport=httpx.HTTPTransport(uds=http_of(d).unix_path))
    assert c.generate(model="tiny", prompt="hi", options=OPTS).eval_count == 6


# -- framing, exactly ----------------------------------------------------------------------


def test_ndjson_framing_is_ollamas(web):
    d = web()
    status, headers, body = raw(d, "POST", "/api/generate", {"model": "tiny", "prompt": "hello", "options": OPTS})
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in body.splitlines()]
    for line in lines[:-1]:
        assert set(line) == {"model", "created_at", "response", "done"} and line["done"] is False
        datetime.fromisoformat(line["created_at"].replace("Z", "+00:00"))
    last = lines[-1]
    assert list(last)[:5] == ["model", "created_at", "response", "done", "done_reason"]
    assert set(last) == {"model", "created_at", "response", "done", "done_reason", *STATS} and last["response"] == ""

    status, headers, body = raw(d, "POST", "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                         "options": OPTS})  # fmt: skip
    lines = [json.loads(x) for x in body.splitlines()]
    assert all(set(x) == {"model", "created_at", "message", "done"} for x in lines[:-1])
    assert lines[-1]["message"] == {"role": "assistant", "content": ""} and lines[-1]["done_reason"] == "length"

    status, headers, body = raw(d, "POST", "/api/generate", {"prompt": "hello", "stream": False, "options": OPTS})
    whole = json.loads(body)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert whole["model"] == "tiny" and whole["done"] is True and whole["response"] and set(STATS) <= set(whole)


def test_openai_sse_framing(web):
    d = web()
    req = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
           "stream": True, "stream_options": {"include_usage": True}}
    status, headers, body = raw(d, "POST", "/v1/chat/completions", req)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"


# -- the openai client ---------------------------------------------------------------------


def test_openai_client_chat_completion_streaming_and_not(web):
    d = web()
    o = openai.OpenAI(base_url=base(d) + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    done = o.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, seed=3)
    assert done.choices[0].finish_reason == "length" and done.choices[0].message.content
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 0 and done.id.startswith("chatcmpl-")
    text = ""
    for chunk in o.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, seed=3, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == done.choices[0].message.content
    again = o.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, seed=3)
    assert again.usage.prompt_tokens == done.usage.prompt_tokens  # the whole prompt, also when cached tokens served part
    assert [m.id for m in o.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as e:
        o.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        o.chat.completions.create(model="tiny", messages=msgs, temperature=-1)
    assert e.value.body["type"] == "invalid_request_error" and "temperature" in e.value.body["message"]


# -- curl over the Unix socket -------------------------------------------------------------


def test_curl_over_the_unix_socket(web):
    d = web()
    path = http_of(d).unix_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the JSON Lines socket's mode
    out = curl_unix(d, "http://localhost/api/generate", "-d",
                    json.dumps({"model": "tiny", "prompt": "hi", "stream": False, "options": OPTS}))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["eval_count"] == 6
    out = curl_unix(d, "-N", "http://localhost/api/chat", "-d",
                    json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "options": OPTS}))
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) > 1 and lines[-1]["done"] is True
    assert json.loads(curl_unix(d, "http://localhost/api/tags").stdout)["models"][0]["name"] == "tiny:latest"


def test_unix_socket_uses_the_sockets_allowlist(web, tmp_path):
    d = web(socket__allow_uids=[os.getuid() + 4242])
    out = curl_unix(d, "-i", "http://localhost/api/tags")
    assert out.stdout.startswith("HTTP/1.1 403") and "not allowed" in out.stdout
    d2 = web(socket__allow_uids=[os.getuid()], socket__path=unix_path(tmp_path, "two/edged.sock"))
    assert curl_unix(d2, "http://localhost/api/tags").stdout.startswith('{"models"')


# -- hostile and broken input --------------------------------------------------------------


def test_malformed_bodies_get_400_and_the_daemon_keeps_serving(web):
    d = web()
    for body in (b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"[" * 100 + b"]" * 100, b'{"prompt": 5}',
                 b'{"prompt": "x", "options": {"temperature": "hot"}}', b'{"prompt": "x", "stream": "yes"}'):
        status, headers, out = raw(d, "POST", "/api/generate", body)
        assert status == 400, (body, out)
        assert isinstance(json.loads(out)["error"], str)
    status, _, out = raw(d, "POST", "/v1/chat/completions", b"{nope")
    err = json.loads(out)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and err["code"] == "malformed_request"
    status, _, out = raw(d, "POST", "/v1/chat/completions", {"messages": "hi"})
    assert status == 400
    assert raw(d, "GET", "/api/generate")[0] == 405
    assert raw(d, "GET", "/api/nothing")[0] == 404
    assert raw(d, "POST", "/api/pull", {"model": "llama3.2"})[0] == 501
    status, _, out = raw(d, "POST", "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False, "options": OPTS})
    assert status == 200 and json.loads(out)["eval_count"] == 6


def test_oversized_bodies_get_413_while_reading(web):
    d = web(max_request_bytes=4096)
    big = json.dumps({"prompt": "x" * 10_000}).encode()
    status, headers, out = raw(d, "POST", "/api/generate", big)
    assert status == 413 and "4096" in json.loads(out)["error"]
    # Without Content-Length (chunked), the cap applies while the body arrives.
    status, headers, out = raw(d, "POST", "/v1/chat/completions", iter([b"{" + b" " * 3000] * 4))  # http.client: chunked
    assert status == 413 and json.loads(out)["error"]["code"] == "payload_too_large"
    status, _, out = raw(d, "POST", "/api/generate", {"prompt": "hi", "stream": False, "options": OPTS})
    assert status == 200


def test_slow_body_gets_408_and_slow_headers_are_closed(web):
    d = web(http__body_timeout=0.5, http__idle_timeout=0.5)
    host, port = http_of(d).tcp_address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=WAIT)
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
    reply = b""
    while chunk := s.recv(4096):  # the daemon answers, then closes
        reply += chunk
    s.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"100" not in reply.split(b"\r\n\r\n", 1)[1]
    s = socket.create_connection((host, int(port)), timeout=WAIT)
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: loc")  # headers that never end
    assert s.recv(4096) == b""  # closed by the daemon, no request was ever handled
    s.close()
    assert raw(d, "POST", "/api/generate", {"prompt": "hi", "stream": False, "options": OPTS})[0] == 200


def test_connection_cap(web):
    d = web(http__max_connections=2)
    host, port = http_of(d).tcp_address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=WAIT) for _ in range(2)]
    wait_for(lambda: http_of(d).describe()["connections"] == 2, what="two connections")
    extra = socket.create_connection((host, int(port)), timeout=WAIT)
    reply = extra.recv(4096)
    assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After" in reply
    for s in idle + [extra]:
        s.close()
    wait_for(lambda: http_of(d).describe()["connections"] == 0, what="connections closed")
    assert raw(d, "GET", "/api/version")[0] == 200


@pytest.mark.parametrize("stream", [True, False])
def test_disconnecting_client_cancels_its_request(web, stream):
    d = web()
    gate = Gate(at=2)
    d.server.scheduler.token_hooks.append(gate)
    host, port = http_of(d).tcp_address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=WAIT)
    body = json.dumps({"prompt": "hello", "stream": stream, "options": {"num_predict": 200, "temperature": 0}}).encode()
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert gate.reached.wait(WAIT)
    s.close()
    # the worker is held at token 2 and is released only by the cancel the disconnect causes
    wait_for(lambda: d.server.scheduler.running == 0, what="worker to be freed")
    assert max(gate.seen.values()) <= 3 and not gate.timed_out
    gate.release.set()
    assert raw(d, "POST", "/api/generate", {"prompt": "hi", "stream": False, "options": OPTS})[0] == 200


def test_busy_is_503_with_retry_after(web):
    d = web(queue_size=1)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    results = {}

    def ask(name):
        results[name] = raw(d, "POST", "/api/generate", {"prompt": "hi", "stream": False, "options": OPTS})

    first = threading.Thread(target=ask, args=("run",))
    first.start()
    assert gate.reached.wait(WAIT)
    second = threading.Thread(target=ask, args=("wait",))
    second.start()
    wait_for(lambda: d.server.scheduler.depth == 1, what="queued request")
    status, headers, out = raw(d, "POST", "/api/generate", {"prompt": "hi", "stream": False})
    assert status == 503 and int(headers["retry-after"]) >= 1 and "queue" in json.loads(out)["error"]
    o = openai.OpenAI(base_url=base(d) + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        o.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and e.value.code == "busy" and e.value.response.headers["retry-after"]
    gate.release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert results["run"][0] == 200 and results["wait"][0] == 200


# -- who may connect -------------------------------------------------------------------------


def test_bearer_token_on_tcp(web, tmp_path):
    token = "s3cret-token-0123456789abcdef"
    (tmp_path / "token").write_text(token + "\n")
    d = web(http__token_file=str(tmp_path / "token"))
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=base(d)).list()
    assert e.value.status_code == 401
    ok = ollama.Client(host=base(d), headers={"Authorization": f"Bearer {token}"})
    assert ok.list().models
    o = openai.OpenAI(base_url=base(d) + "/v1", api_key=token, max_retries=0)
    assert o.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base(d) + "/v1", api_key="wrong", max_retries=0).models.list()
    # the Unix socket is vouched for by the kernel (peer credentials), not the token
    assert curl_unix(d, "http://localhost/api/tags").stdout.startswith('{"models"')


def test_remote_address_needs_allow_remote_and_a_token(web, tmp_path):
    with pytest.raises(EdgedError, match="allow_remote"):
        web(http__host="0.0.0.0")
    with pytest.raises(EdgedError, match="needs a token"):
        web(http__host="0.0.0.0", http__allow_remote=True)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(EdgedError, match="at least 16"):
        web(http__token_file=str(tmp_path / "short"))


def test_port_in_use_stops_the_start_with_a_clear_message(web):
    with socket.socket() as taken:  # e.g. Ollama itself on 11434
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(EdgedError, match="cannot listen for HTTP on 127.0.0.1:%d" % taken.getsockname()[1]):
            web(http__port=taken.getsockname()[1])


def test_host_and_origin_checks(web):
    d = web(http__origins=["https://app.example"])
    assert raw(d, "GET", "/api/tags", headers={"Host": "evil.example:11434"})[0] == 403  # DNS rebinding
    assert raw(d, "GET", "/api/tags", headers={"Origin": "http://evil.example"})[0] == 403
    status, headers, _ = raw(d, "GET", "/api/tags", headers={"Origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, headers, _ = raw(d, "OPTIONS", "/api/chat", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})  # fmt: skip
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in headers["access-control-allow-methods"]


def test_http_is_off_by_default(start_daemon):
    d = start_daemon()
    assert "http" not in d.server.status()["transports"]


# -- the real model ------------------------------------------------------------------------


@pytest.fixture
def smol_web(smollm2_engine, smollm2_store, tmp_path):
    cfg = daemon_config(tmp_path, smollm2_store.root, model="smollm2-135m", engine__threads=2,
                        http__enabled=True, http__port=free_port())
    d = DaemonThread(cfg, engine=smollm2_engine, store=smollm2_store).start()
    yield d
    d.stop()


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_ollama_client_answers_and_follows_a_schema(smol_web):
    c = ollama.Client(host=base(smol_web))
    r = c.generate(model="smollm2-135m", prompt="What is the capital of France?", options={"temperature": 0, "num_predict": 16})
    assert "Paris" in r.response
    chunks = list(c.chat(model="smollm2-135m", messages=Q, options={"temperature": 0, "num_predict": 16}, stream=True))
    assert "Paris" in "".join(ch.message.content for ch in chunks)
    shaped = c.chat(model="smollm2-135m", messages=[{"role": "user", "content": "Name the capital of France and its country."}],
                    format=CITY, options={"temperature": 0, "num_predict": 64})
    obj = json.loads(shaped.message.content)
    jsonschema.validate(obj, CITY)
    assert "Paris" in obj["city"]
    called = c.chat(model="smollm2-135m", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[WEATHER_TOOL], options={"temperature": 0})
    call = called.message.tool_calls[0]
    assert call.function.name == "get_weather" and "Paris" in call.function.arguments["city"]


@pytest.mark.slow
def test_smollm2_openai_client_streaming_schema_and_tools(smol_web):
    o = openai.OpenAI(base_url=base(smol_web) + "/v1", api_key="unused")
    r = o.chat.completions.create(model="smollm2-135m", messages=Q, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   o.chat.completions.create(model="smollm2-135m", messages=Q, temperature=0, max_tokens=16, stream=True)
                   if ch.choices)
    assert text == r.choices[0].message.content
    shaped = o.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Name the capital of France and its country."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}, temperature=0,
    )  # fmt: skip
    jsonschema.validate(json.loads(shaped.choices[0].message.content), CITY)
    called = o.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER_TOOL], temperature=0)
    assert called.choices[0].finish_reason == "tool_calls"
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
    streamed = [ch for ch in o.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                                       tools=[WEATHER_TOOL], temperature=0, stream=True)]  # fmt: skip
    calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and streamed[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_smollm2_ollama_client_against_edged_serve_process(smollm2_store, tmp_path):
    """`edged serve` as a user runs it, and the ollama client as a user types it."""
    port = free_port()
    cfg = daemon_config(tmp_path, smollm2_store.root, model="smollm2-135m", engine__threads=2,
                        http__enabled=True, http__port=port)
    with DaemonProcess(tmp_path, cfg) as p:
        p.wait_ready()
        c = ollama.Client(host=f"http://127.0.0.1:{port}")
        assert [m.model for m in c.list().models] == ["smollm2-135m:latest"]
        r = c.chat(model="smollm2-135m", messages=Q, options={"temperature": 0, "num_predict": 16})
        assert "Paris" in r.message.content and r.eval_count > 0
        assert c.ps().models[0].model == "smollm2-135m:latest"
        assert c.show("smollm2-135m").modelinfo["llama.context_length"] == 8192
        assert p.stop() == 0
    assert "HTTP (Ollama and OpenAI APIs) on http://127.0.0.1:%d" % port in p.logtext()
