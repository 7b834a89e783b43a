"""Tool calls: chat requests with Ollama's `tools` list get a forced call whose arguments
validate against the tool's parameters; a `tool` message continues the conversation."""

import json

import jsonschema
import pytest

from helpers import DaemonThread, daemon_config
from edged import protocol
from edged.engine.constrain import tool_calls
from edged.engine.request import GenerateRequest
from edged.engine.template import ChatTemplate
from edged.errors import RequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20, "description": "city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch a light <on> & off",
        "parameters": {
            "type": "object",
            "properties": {"room": {"enum": ["kitchen", "hall", "bedroom"]}, "on": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["room", "on"],
        },
    },
}
TOOLS = [WEATHER, LIGHT]
# The tools' system message alone outgrows the tiny model's 256-token context: keep its end.
TINY = {"truncate": True, "num_predict": 120}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def chat(messages, **extra) -> GenerateRequest:
    return GenerateRequest.from_dict({"messages": messages, "tools": TOOLS, **extra})


def assert_valid_call(calls):
    assert isinstance(calls, list) and len(calls) == 1
    (call,) = calls
    assert set(call) == {"function"} and set(call["function"]) == {"name", "arguments"}
    name, args = call["function"]["name"], call["function"]["arguments"]
    assert name in PARAMS
    jsonschema.validate(args, PARAMS[name])
    return name, args


def test_forced_calls_have_ollamas_shape_and_valid_arguments(tiny_engine):
    names = set()
    for seed in range(40):
        r = chat([{"role": "user", "content": f"do something {seed}"}], options={"temperature": 3.0, "top_k": 0, "top_p": 1.0, "seed": seed, **TINY})
        assert r.forces_tool_call
        g = tiny_engine.generate(r)
        g.run()
        assert g.done_reason == "stop", g.text
        names.add(assert_valid_call(tool_calls(r, g.text, g.done_reason))[0])
    assert names == set(PARAMS)  # both alternatives of the grammar are reachable


def test_tool_calls_in_the_final_frame_over_the_socket(tiny_engine, tiny_store, tmp_path):
    cfg = daemon_config(tmp_path, tiny_store.root, batch_size=4, limits={"max_queued_per_requester": 8})
    with DaemonThread(cfg, engine=tiny_engine, store=tiny_store) as d, d.client() as c:
        user = [{"role": "user", "content": "Weather in Oslo?"}]
        reqs = {
            "call": {"messages": user, "tools": TOOLS, "options": {"temperature": 0, **TINY}},
            "sampled": {"messages": user, "tools": TOOLS, "options": {"temperature": 0.9, "seed": 4, **TINY}, "stream": True},
            "cut": {"messages": user, "tools": TOOLS, "options": {"temperature": 0, "truncate": True, "num_predict": 3}},
            "plain": {"messages": user, "options": {"temperature": 0, "num_predict": 8}},
            "json": {"prompt": "x", "format": WEATHER["function"]["parameters"], "options": {"temperature": 0.7, "seed": 1}},
        }
        for rid, body in reqs.items():
            c.send({"id": rid, "stream": False, **body})
        finals = {}
        deltas = []
        while len(finals) < len(reqs):
            f = c.read()
            if f.get("done"):
                finals[f["id"]] = f
            else:
                deltas.append(f)
        for rid in ("call", "sampled"):
            m = finals[rid]["message"]
            assert finals[rid]["done_reason"] == "stop" and m["role"] == "assistant" and m["content"] == ""
            assert_valid_call(m["tool_calls"])
        assert "".join(f["delta"] for f in deltas if f["id"] == "sampled")  # the call's JSON streamed as deltas
        cut = finals["cut"]
        assert cut["done_reason"] == "length" and "tool_calls" not in cut["message"] and cut["message"]["content"]
        assert "tool_calls" not in finals["plain"]["message"]
        assert "response" in finals["json"], finals["json"]
        jsonschema.validate(json.loads(finals["json"]["response"]), WEATHER["function"]["parameters"])
        # the conversation goes on: the call, then the tool's result; the answer is text
        call = finals["call"]["message"]
        follow = {
            "id": "after",
            "messages": user + [call, {"role": "tool", "content": '{"temp_c": 21}', "tool_name": call["tool_calls"][0]["function"]["name"]}],
            "tools": TOOLS,
            "options": {"temperature": 0, "truncate": True, "num_predict": 12},
            "stream": False,
        }
        after = d.call(follow)
        assert "error" not in after, after
        assert "tool_calls" not in after["message"] and after["done_reason"] in ("stop", "length")


def test_a_tool_result_ends_the_forcing_and_format_applies_after_it(tiny_engine):
    convo = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "tool", "content": "21 C, sunny"},
    ]
    free = chat(convo, options={"temperature": 0, "truncate": True, "num_predict": 10})
    assert not free.forces_tool_call
    assert tiny_engine.prepare(free).grammar is None
    schema = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 30}}, "required": ["summary"]}
    shaped = chat(convo, format=schema, options={"temperature": 0.8, "seed": 2, **TINY})
    g = tiny_engine.generate(shaped)
    g.run()
    assert g.done_reason == "stop"
    jsonschema.validate(json.loads(g.text), schema)
    assert tool_calls(shaped, g.text, g.done_reason) is None


def test_system_prompt_form_renders_tools_calls_and_results(tiny_engine, smollm2_store):
    """Templates that do not use `tools` (the tiny model's, SmolLM2's) get the tools in the
    system message, the earlier call as the JSON the model is made to write and the tool
    result as a user turn."""
    convo = [
        {"role": "system", "content": "You run a house."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "tool", "content": "21 C, sunny"},
    ]
    smol = ChatTemplate((smollm2_store.get("smollm2-135m").path / "chat_template.jinja").read_text())
    assert not smol.renders_tools and not tiny_engine.template.renders_tools
    for text in (tiny_engine.render(chat(convo)), smol.render(list(chat(convo).messages), tools=chat(convo).tools)):
        system = text.split("<|im_end|>")[0]
        assert "You run a house." in system and "<tools>" in system
        assert json.dumps(WEATHER["function"]) in system and json.dumps(LIGHT["function"]) in system
        assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}<|im_end|>' in text
        assert "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response><|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")


# A template that renders tools itself, in the manner of Qwen2.5's.
NATIVE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif not (tools and m.role == 'system') %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_renders_tools_gets_them():
    t = ChatTemplate(NATIVE)
    assert t.renders_tools
    r = chat([
        {"role": "user", "content": "Lights off in the hall"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "set_light", "arguments": {"room": "hall", "on": False}}}]},
        {"role": "tool", "content": "ok"},
    ])
    text = t.render(list(r.messages), tools=r.tools)
    assert json.dumps(dict(LIGHT), ensure_ascii=False) in text  # tojson as transformers has it: no HTML escaping
    assert '<tool_call>\n{"name": "set_light", "arguments": {"room": "hall", "on": false}}\n</tool_call>' in text
    assert "<tool_response>\nok\n</tool_response>" in text
    assert "You can call these tools" not in text  # not the system-prompt form


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "tools": TOOLS}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools[0].type"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "a", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "a", "parameters": {"type": "object", "properties": {"b": {"type": "nope"}}}}}]}, "tools[0].function.parameters"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "a", "description": 5}}]}, "tools[0].function.description"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "a", "arguments": [1]}}]}]}, "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": "get_weather"}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "tool", "content": "x", "tool_name": 3}]}, "messages[0].tool_name"),
    ],
)
def test_bad_tools_are_invalid_requests_naming_the_field(body, field):
    with pytest.raises(RequestError) as e:
        protocol.parse(body, default_stream=False)
    assert e.value.code == "invalid_request" and e.value.details["field"] == field


def test_tools_without_parameters_and_openai_style_arguments_are_accepted(tiny_engine):
    r = GenerateRequest.from_dict({
        "messages": [
            {"role": "user", "content": "ping"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "ping", "arguments": "{\"n\": 1}"}}]},
            {"role": "tool", "content": "pong"},
            {"role": "user", "content": "again"},
        ],
        "tools": [{"function": {"name": "ping"}}],
        "options": {"temperature": 0, **TINY},
    })
    assert r.messages[1]["tool_calls"][0]["function"]["arguments"] == {"n": 1}
    g = tiny_engine.generate(r)
    g.run()
    (call,) = tool_calls(r, g.text, g.done_reason)
    assert call == {"function": {"name": "ping", "arguments": {}}}


@pytest.mark.slow
def test_smollm2_forced_calls_validate(smollm2_engine):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "set_light", "description": "Turn a light on or off",
         "parameters": {"type": "object", "properties": {"room": {"type": "string"}, "on": {"type": "boolean"}}, "required": ["room", "on"]}}},
    ]  # fmt: skip
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for prompt in ("What's the weather in Berlin?", "Turn off the kitchen light", "Is it raining in Lyon, in fahrenheit?"):
        for opts in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
            r = GenerateRequest.from_dict({"messages": [{"role": "user", "content": prompt}], "tools": tools, "options": {**opts, "num_predict": 120}})
            g = smollm2_engine.generate(r)
            g.run()
            assert g.done_reason == "stop", g.text
            (call,) = tool_calls(r, g.text, g.done_reason)
            jsonschema.validate(call["function"]["arguments"], params[call["function"]["name"]])
