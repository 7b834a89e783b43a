"""Structured output (`format`): every complete answer parses and validates against its
schema, whatever the sampling, stop strings, batching or num_predict; a cut-off answer
says so in done_reason."""

import json

import jsonschema
import pytest

from helpers import edged_cli
from edged import protocol
from edged.engine.batch import BatchDecoder
from edged.engine.request import GenerateRequest
from edged.errors import EdgedError, RequestError

ALERT = {
    "type": "object",
    "properties": {"alert": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 24}},
    "required": ["alert", "reason"],
}
READING = {
    "type": "object",
    "properties": {
        "sensor": {"enum": ["temp", "humidity", "door"]},
        "value": {"type": "number", "minimum": -40, "maximum": 125},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["sensor", "value", "ok", "count"],
}
NESTED = {
    "type": "object",
    "properties": {
        "device": {
            "type": "object",
            "properties": {"id": {"type": "string", "pattern": "^[a-z]{2,8}-[0-9]{1,3}$"}, "room": {"type": "string", "maxLength": 12}},
            "required": ["id", "room"],
        },
        "readings": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
        "note": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["device", "readings", "note"],
}
SWITCH = {
    "anyOf": [
        {"type": "object", "properties": {"kind": {"const": "on"}, "level": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["kind", "level"]},
        {"type": "object", "properties": {"kind": {"const": "off"}, "after_s": {"type": "integer", "minimum": 1, "maximum": 60}}, "required": ["kind"]},
    ]
}
POINTS = {
    "$defs": {
        "pt": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99}, "y": {"type": "integer", "minimum": -99, "maximum": 99}},
            "required": ["x", "y"],
        }
    },
    "type": "object",
    "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
    "required": ["from", "to"],
}
SCHEMAS = {"alert": ALERT, "reading": READING, "nested": NESTED, "switch": SWITCH, "points": POINTS}
SAMPLING = [
    {"temperature": 0},
    {"temperature": 0.8},
    {"temperature": 1.5, "top_k": 0, "top_p": 1.0},  # the whole vocabulary in play
    {"temperature": 0.8, "repeat_penalty": 1.5, "min_p": 0.05},
]


def req(prompt: str, fmt, **options) -> GenerateRequest:
    return GenerateRequest.from_dict({"prompt": prompt, "format": fmt, "options": options})


def run(engine, r: GenerateRequest):
    g = engine.generate(r)
    g.run()
    return g


def test_every_constrained_answer_parses_and_validates(tiny_engine):
    """5 schemas x 4 sampling settings x 13 seeds = 260 generations, all complete and valid."""
    n = valid = 0
    for name, schema in SCHEMAS.items():
        for opts in SAMPLING:
            for seed in range(13):
                g = run(tiny_engine, req(f"{name} {seed}", schema, seed=seed, **opts))
                n += 1
                assert g.done_reason == "stop", (name, opts, seed, g.text)
                jsonschema.validate(json.loads(g.text), schema)
                valid += 1
    print(f"\nschema-valid answers: {valid} of {n} constrained generations ({100 * valid / n:.0f} %)")
    assert n == valid >= 200


def test_objects_get_only_their_listed_keys_and_answers_end_at_the_closing_brace(tiny_engine):
    for seed in range(5):
        g = run(tiny_engine, req("x", ALERT, seed=seed, temperature=1.0))
        assert set(json.loads(g.text)) == {"alert", "reason"}
        assert g.text.endswith("}") and g.text == g.text.strip()
        assert g.stats["eval_count"] == len(g.tokens)  # ended by the grammar, not by a sampled EOS


def test_format_json_is_any_object_or_an_honest_cut(tiny_engine):
    for seed in range(8):
        g = run(tiny_engine, req("y", "json", seed=seed, temperature=0.8, num_predict=120))
        if g.done_reason == "stop":
            assert isinstance(json.loads(g.text), dict)
        else:
            assert g.done_reason == "length"
            with pytest.raises(ValueError):
                json.loads(g.text)


def test_a_cut_off_answer_says_length_and_is_not_valid_json(tiny_engine):
    short = run(tiny_engine, req("z", NESTED, temperature=0, num_predict=6))
    assert short.done_reason == "length" and short.stats["eval_count"] == 6
    with pytest.raises(ValueError):
        json.loads(short.text)
    whole = run(tiny_engine, req("z", NESTED, temperature=0))
    assert whole.done_reason == "stop"
    jsonschema.validate(json.loads(whole.text), NESTED)
    assert whole.text.startswith(short.text)  # the same answer, cut


def test_stop_strings_do_not_cut_a_constrained_answer(tiny_engine):
    stops = ['":', ",", "}"]
    for seed in range(6):
        g = run(tiny_engine, req("s", READING, seed=seed, temperature=0.8, stop=stops))
        assert g.done_reason == "stop"
        jsonschema.validate(json.loads(g.text), READING)
        assert '":' in g.text and "," in g.text  # the stop strings occur, and cut nothing
    # without a format the same stop strings do cut
    free = run(tiny_engine, GenerateRequest.from_dict({"prompt": "s", "options": {"temperature": 0, "num_predict": 60}}))
    words = free.text.split()
    assert len(words) >= 2
    cut = run(tiny_engine, GenerateRequest.from_dict({"prompt": "s", "options": {"temperature": 0, "num_predict": 60, "stop": [words[1]]}}))
    assert cut.done_reason == "stop" and words[1] not in cut.text and len(cut.text) < len(free.text)


def test_batched_constrained_and_free_requests_keep_their_own_state(tiny_engine):
    """Constrained (different schemas, sampled and greedy) and unconstrained requests share
    decode steps, joining and leaving; each gets what it gets alone."""
    jobs = [
        ("free a", None, {"temperature": 0, "num_predict": 25}),
        ("alert", ALERT, {"temperature": 0.8, "seed": 3}),
        ("reading", READING, {"temperature": 0}),
        ("free b", None, {"temperature": 0, "num_predict": 40}),
        ("nested", NESTED, {"temperature": 0.8, "seed": 11}),
        ("points", POINTS, {"temperature": 0}),
        ("switch", SWITCH, {"temperature": 1.2, "seed": 5}),
    ]
    alone = [run(tiny_engine, GenerateRequest.from_dict({"prompt": p, "format": f, "options": o})) for p, f, o in jobs]
    batch = BatchDecoder(tiny_engine, slots=4, capacity=256)
    texts = {i: [] for i in range(len(jobs))}
    done: dict[int, dict] = {}
    pending = list(range(len(jobs)))
    most = 0
    while pending or batch.active:
        while pending and batch.free:
            i = pending.pop(0)
            p, f, o = jobs[i]
            prep = tiny_engine.prepare(GenerateRequest.from_dict({"prompt": p, "format": f, "options": o}))
            batch.add(prep, on_delta=texts[i].append, on_done=lambda st, i=i: done.__setitem__(i, st))
        most = max(most, batch.step())
    assert most == 4
    for i, (_, schema, _) in enumerate(jobs):
        text = "".join(texts[i])
        assert text == alone[i].text, jobs[i][0]
        assert done[i]["done_reason"] == alone[i].done_reason
        if schema is not None:
            assert done[i]["done_reason"] == "stop"
            jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "fmt",
    [
        "xml",
        5,
        ["json"],
        {"type": "foo"},
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
        {"type": "integer", "minimum": 5, "maximum": 2},
        {"type": "string", "pattern": "(("},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    ],
)
def test_a_format_that_cannot_be_enforced_is_an_invalid_request_naming_format(fmt):
    with pytest.raises(RequestError) as e:
        protocol.parse({"prompt": "x", "format": fmt}, default_stream=False)
    assert e.value.code == "invalid_request" and e.value.details["field"] == "format"


def test_empty_or_null_format_is_free_text(tiny_engine):
    for fmt in ("", None):
        f = protocol.parse({"prompt": "x", "format": fmt}, default_stream=False)
        assert f.gen.format is None
        assert tiny_engine.prepare(f.gen).grammar is None


def test_cli_run_format_inline_file_and_refusal(tiny_store, tmp_path):
    home = tiny_store.root.parent
    inline = edged_cli("run", "tiny", "x", "--format", json.dumps(ALERT), "--temperature", "0", home=home, timeout=120)
    assert inline.returncode == 0, inline.stderr
    jsonschema.validate(json.loads(inline.stdout), ALERT)
    path = tmp_path / "reading.json"
    path.write_text(json.dumps(READING))
    from_file = edged_cli("run", "tiny", "x", "--format", f"@{path}", "--temperature", "0.8", "--seed", "2", home=home, timeout=120)
    assert from_file.returncode == 0, from_file.stderr
    jsonschema.validate(json.loads(from_file.stdout), READING)
    any_obj = edged_cli("run", "tiny", "x", "--format", "json", "--temperature", "0", "--num-predict", "200", "--verbose", home=home, timeout=120)
    assert any_obj.returncode == 0, any_obj.stderr
    if "done: stop" in any_obj.stderr:
        assert isinstance(json.loads(any_obj.stdout), dict)
    bad = edged_cli("run", "tiny", "x", "--format", '{"type": "foo"}', home=home, timeout=120)
    assert bad.returncode == 1 and "'format'" in bad.stderr and "foo" in bad.stderr


@pytest.mark.slow
def test_a_tokenizer_the_constraint_engine_misreads_is_refused(smollm2_engine):
    """SmolLM2's converted tokenizer has a decoder Sequence (ByteFallback, ..., ByteLevel);
    read as-is, llguidance would take "Ċ" for a letter and let a raw newline into a JSON
    string. edged hands it the ByteLevel reading and checks every token's bytes."""
    from llguidance import LLTokenizer

    from edged.engine.constrain import Constraints, _check_bytes

    raw = LLTokenizer(smollm2_engine.model.file("tokenizer").read_text(), n_vocab=smollm2_engine.info.vocab_size)
    with pytest.raises(EdgedError, match="reads .* tokens differently"):
        _check_bytes(raw, smollm2_engine.tokenizer)
    c = Constraints.of(smollm2_engine)  # the corrected reading passes the same check
    newline = smollm2_engine.tokenizer.encode("\n", add_special_tokens=False).ids[0]
    assert c.tokenizer.decode_bytes([newline]) == b"\n"


@pytest.mark.slow
def test_smollm2_answers_validate_with_the_recommended_prompt(smollm2_engine):
    schema = {
        "type": "object",
        "properties": {"alert": {"type": "boolean"}, "reason": {"type": "string"}},
        "required": ["alert", "reason"],
    }
    prompt = (
        "The kitchen temperature sensor reads 58 C. Is that an alert? "
        f"Respond in JSON following this schema: {json.dumps(schema)}"
    )
    outcomes = []
    for opts in [{"temperature": 0}] + [{"temperature": 0.8, "seed": s} for s in range(4)]:
        g = run(smollm2_engine, GenerateRequest.from_dict({"messages": [{"role": "user", "content": prompt}], "format": schema, "options": {**opts, "num_predict": 200}}))
        outcomes.append(g.done_reason)
        if g.done_reason == "stop":
            value = json.loads(g.text)
            jsonschema.validate(value, schema)
            assert set(value) == {"alert", "reason"}
        else:  # a string that never closed within num_predict: said, not hidden
            assert g.done_reason == "length"
            with pytest.raises(ValueError):
                json.loads(g.text)
    assert outcomes.count("stop") >= 4, outcomes
