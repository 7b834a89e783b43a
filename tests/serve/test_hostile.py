"""Hostile devices and local clients against real daemons and a real mosquitto.

- Generated inputs (hypothesis), a few hundred per transport: random bytes, random JSON
  (deep nesting, huge numbers, NaN, lone surrogates, U+0000), requests with hostile field
  values (ids, reply_to, options), hostile MQTT properties (Response Topic outside the
  policy, over-long Correlation Data) and payloads over the size limits. Each one gets
  exactly one final frame (an error code and message, or an answer), or, over the packet
  size the broker takes (max_packet_size, as examples/mosquitto.conf sets it), none: the
  broker refuses it. A spy subscribed to `#` sees nothing published outside the allowed
  topics; error messages carry no traceback, path or exception name; the daemon stays
  connected and answers a good device afterwards.
- The specific attacks: actuator topics as Response Topic or `reply_to`, U+0000 in a
  reply topic, a wildcard Response Topic next to another device's stream, 10,000-level
  nesting, over-long correlation data.
- examples/mosquitto-acl.conf and examples/mosquitto.conf: the daemon and devices under
  the shipped ACL.
- Over-size publishes on a broker without max_packet_size, and retained requests.

Each generated test starts one daemon and runs every example against it; per-class
counts of how inputs were answered are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.serve.config import Config
from edged.transports.mqtt import PACKET_OVERHEAD  # edged announces max_request_bytes + this as its Maximum Packet Size
from helpers import REPO, WAIT, Broker, Device, Gate, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

NODE = "edged/testnode"
REQUEST, CANCEL, ERROR = f"{NODE}/request", f"{NODE}/cancel", f"{NODE}/error"
DAEMON_TOPICS = {f"{NODE}/{t}" for t in ("status", "info", "telemetry", "error")}
# The default reply policy as docs/protocol.md states it.
REPLY_PATTERNS = ("+/reply", "+/+/reply", "+/+/+/reply", "reply/#", "replies/#")
LIMIT = 64 * 1024  # max_request_bytes of the daemons here
PROBE_TOPIC = "replies/zz-probe"
# Generated inputs per transport (the explicit ones come on top). The same inputs on every
# run; EDGED_HOSTILE_RANDOM=1 draws new ones, EDGED_HOSTILE_EXAMPLES=N more of them.
EXAMPLES = int(os.environ.get("EDGED_HOSTILE_EXAMPLES", 240))
CASE_WAIT = 60.0  # per input; a generous bound, never an assertion about speed

HOSTILE_CFG = {"max_request_bytes": LIMIT, "limits": {"max_num_predict": 4}, "queue_size": 64}
GEN = {"prompt": "hello there", "options": {"num_predict": 2, "temperature": 0}}


def allowed_output(topic: str) -> bool:
    """Where the daemon may publish: its own four topics and the default reply patterns."""
    if topic in DAEMON_TOPICS:
        return True
    if topic.startswith("$") or topic == "edged" or topic.startswith("edged/"):
        return False
    return any(mqtt.topic_matches_sub(p, topic) for p in REPLY_PATTERNS)


def device_input(topic: str) -> bool:
    """Topics only devices publish on (the daemon's request and cancel topics)."""
    return topic in (REQUEST, CANCEL) or topic.startswith((REQUEST + "/", CANCEL + "/"))


# -- what a clear reply looks like ----------------------------------------------------------

LEAKS = re.compile(r"Traceback|/work|/tmp|\.py\b|\b[A-Z][A-Za-z]*(?:Error|Exception)\b")


def check_final(frame: object, sent: bytes, quoted: bytes = b"") -> str:
    """The outcome of one final frame (an error code, `answer`, or the op's reply key);
    AssertionError when it is not a clear reply or its message leaks internals. `sent` is
    the request; `quoted` other input the message may repeat (an MQTT Response Topic)."""
    assert isinstance(frame, dict) and frame.get("done") is True, frame
    err = frame.get("error")
    if err is not None:
        assert isinstance(err, dict), frame
        code, message = err.get("code"), err.get("message")
        assert isinstance(code, str) and code and isinstance(message, str) and message, frame
        assert code != "internal_error", f"internal_error for {sent[:300]!r}"
        # A message may quote the input back (a field name, a topic); nothing else may show.
        text = (sent + quoted).decode("utf-8", "replace")
        for m in LEAKS.finditer(message):
            assert m.group() in text, f"error message leaks {m.group()!r}: {message!r}"
        return code
    if "response" in frame or "message" in frame:
        return "answer"
    for key in ("health", "status", "models", "cancelled"):
        if key in frame:
            return key
    raise AssertionError(f"final frame is neither an error nor an answer: {frame}")


def print_table(title: str, counts: Counter) -> None:
    print(f"\n{title}")
    for kind in sorted({k for k, _ in counts}):
        row = {o: n for (k, o), n in counts.items() if k == kind}
        print(f"  {kind:24s} {sum(row.values()):4d}  " + ", ".join(f"{o} {n}" for o, n in sorted(row.items())))
    print(f"  {'total':24s} {sum(counts.values()):4d}")


# -- strategies -----------------------------------------------------------------------------

# Text with everything in it: controls, U+0000, lone surrogates, wildcards, quotes, newlines.
any_char = st.one_of(
    st.characters(exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from('\x00\x01\x7f\x85\ufffe\U0010ffff+#/$\n"\\'),
)
any_text = st.text(any_char, max_size=40)
huge_int = st.integers(min_value=2**63 - 2, max_value=10**60) | st.integers(max_value=-(2**63), min_value=-(10**60))
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), huge_int, st.floats(allow_nan=True, allow_infinity=True), any_text
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def dumps(obj, ascii_only: bool) -> bytes:
    """JSON as a device might send it: NaN/Infinity literals allowed; lone surrogates either
    escaped (\\ud800) or, without ASCII escaping, as raw (invalid UTF-8) bytes."""
    return json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


HOSTILE_TOPICS = [
    "home/door/set", "home/window/set", "$SYS/x", "$SYS/broker/x", "$share/g/replies/x",
    REQUEST, REQUEST + "/dev", CANCEL, f"{NODE}/status", ERROR, "edged/other/reply", "edged",
    "a\x00b", "replies/\x00", "replies/\x01x", "replies/\x7f", "replies/\x9f", "replies/\ufffe",
    "replies/\ufdd0", "replies/\U0010ffff", "replies/\ud800", "replies/+", "replies/#", "r/+/x", "#", "+",
    "+/reply", "", "/", "//", "/reply", "reply", "replies", "x" * 300, "replies/" + "x" * 248,
    "replies/" + "x" * 249, "replies/" + "\u00e9" * 200, "a/b/c/d/reply", "REPLIES/x", " replies/x",
    "replies/ok", "dev/reply", "sensors/kitchen/reply",
]  # fmt: skip
SPY_EXTRA = ["$SYS/x", "$SYS/broker/x"]  # `#` does not match `$` topics: watch the ones we name
hostile_topic = st.one_of(
    st.sampled_from(HOSTILE_TOPICS), any_text, any_text.map(lambda t: "replies/" + t), any_text.map(lambda t: t + "/reply")
)
hostile_reply_to = st.one_of(hostile_topic, json_value)


def broker_accepts(s: str) -> bool:
    """Strings mosquitto takes in a Response Topic property (it drops a client that sends
    U+0000, controls, non-characters or surrogates: the broker's business, not edged's)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(s) and not any(
        ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F or 0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE for c in s
    )


hostile_response_topic = hostile_topic.filter(broker_accepts)
topic_level = st.text(
    st.characters(exclude_characters="/+#", exclude_categories=("Cs", "Cc")), max_size=24
).filter(lambda s: broker_accepts(s) or s == "")

ids = st.one_of(
    st.integers(), huge_int, st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(any_char, max_size=300), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
BASES = [
    GEN,
    {"op": "chat", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}},
    {"op": "health"}, {"op": "status"}, {"op": "models"}, {"op": "cancel", "target": "t1"},
]  # fmt: skip
FIELDS = ["id", "op", "prompt", "system", "messages", "options", "stream", "raw", "model", "priority", "timeout_ms",
          "reply_to", "target", "keep_alive", "format", "tools", "extra", ""]  # fmt: skip
option_value = st.one_of(
    st.sampled_from([0, -1, 1, 0.0, -0.0, 1e-300, 1e308, 2**31, 2**63, float("nan"), float("inf"), float("-inf")]),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), huge_int, json_value,
)  # fmt: skip
OPTIONS = ["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "num_predict",
           "num_ctx", "stop", "truncate", "bogus"]  # fmt: skip


@dataclass
class Case:
    kind: str
    payload: bytes
    topic: str = REQUEST  # MQTT: where the device publishes it
    response_topic: str | None = "replies/hostile"  # MQTT 5 Response Topic
    corr: bytes | None = None  # MQTT 5 Correlation Data (None: a unique tag)
    silent: bool = False  # no reply: over the packet size, refused by the broker
    v311: bool = False  # MQTT: sent by an MQTT 3.1.1 device (no properties at all)

    def __repr__(self) -> str:  # for failure messages: long payloads cut short
        p = self.payload if len(self.payload) <= 300 else self.payload[:300] + b"...(%d bytes)" % len(self.payload)
        return (f"Case({self.kind}, topic={self.topic!r}, response_topic={self.response_topic!r}, "
                f"corr={self.corr!r}, v311={self.v311}, payload={p!r})")


def _nested(depth: int, shape: str) -> bytes:
    if shape == "array":
        return b"[" * depth + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if shape == "in_field":
        return b'{"op":"health","id":' + b"[" * depth + b"]" * depth + b"}"
    return b"[" * depth  # never closed


def _huge_number(digits: int, form: str, where: str) -> bytes:
    n = {"int": "7" * digits, "neg": "-" + "9" * digits, "exp": f"1e{digits}", "tiny": f"-1e-{digits}",
         "frac": "0." + "3" * digits}[form]  # fmt: skip
    return {"id": f'{{"op":"health","id":{n}}}', "num_predict": f'{{"prompt":"hi","options":{{"num_predict":{n}}}}}',
            "priority": f'{{"prompt":"hi","options":{{"num_predict":2}},"priority":{n}}}'}[where].encode()  # fmt: skip


@st.composite
def hostile_fields(draw) -> bytes:
    obj = dict(draw(st.sampled_from(BASES)))
    for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        obj[key] = draw(ids if key in ("id", "target") else json_value)
    if draw(st.booleans()):
        obj["options"] = {**(obj.get("options") if isinstance(obj.get("options"), dict) else {}),
                          **draw(st.dictionaries(st.sampled_from(OPTIONS), json_value, max_size=2))}
    return dumps(obj, draw(st.booleans()))


common = {
    "random_bytes": st.binary(min_size=1, max_size=600).map(lambda b: Case("random_bytes", b)),
    "random_json": st.tuples(json_value, st.booleans()).map(lambda v: Case("random_json", dumps(*v))),
    "deep_json": st.tuples(st.integers(33, 10_000), st.sampled_from(["array", "object", "in_field", "open"])).map(
        lambda v: Case("deep_json", _nested(*v))),
    "huge_number": st.tuples(st.integers(1, 6000), st.sampled_from(["int", "neg", "exp", "tiny", "frac"]),
                             st.sampled_from(["id", "num_predict", "priority"])).map(
        lambda v: Case("huge_number", _huge_number(*v))),
    "hostile_id": st.tuples(ids, st.sampled_from(BASES), st.booleans()).map(
        lambda v: Case("hostile_id", dumps({**v[1], "id": v[0]}, v[2]))),
    "hostile_fields": hostile_fields().map(lambda b: Case("hostile_fields", b)),
    "hostile_options": st.tuples(st.dictionaries(st.sampled_from(OPTIONS), option_value, min_size=1, max_size=3),
                                 st.booleans()).map(
        lambda v: Case("hostile_options", dumps({"prompt": "hi", "options": {"num_predict": 2, **v[0]}}, v[1]))),
    "over_limit": st.integers(LIMIT - 16, LIMIT + PACKET_OVERHEAD - 3072).map(
        lambda n: Case("over_limit", b'{"prompt":"' + b"v" * n + b'"}')),
}
mqtt_only = {
    "hostile_reply_to": st.tuples(hostile_reply_to, st.sampled_from(BASES), st.booleans(), st.booleans()).map(
        lambda v: Case("hostile_reply_to", dumps({**v[1], "reply_to": v[0]}, v[2]), response_topic=None, v311=v[3])),
    "hostile_response_topic": st.tuples(hostile_response_topic, st.sampled_from(BASES)).map(
        lambda v: Case("hostile_response_topic", json.dumps(v[1]).encode(), response_topic=v[0])),
    "hostile_correlation": st.tuples(st.binary(max_size=128) | st.binary(min_size=129, max_size=2000),
                                     st.sampled_from(BASES)).map(
        lambda v: Case("hostile_correlation", json.dumps(v[1]).encode(), corr=v[0])),
    "device_topic": st.tuples(topic_level, st.sampled_from(BASES), st.sampled_from([REQUEST, CANCEL])).map(
        lambda v: Case("device_topic", json.dumps(v[1]).encode(), topic=f"{v[2]}/{v[0]}")),
    "cancel_topic": st.one_of(json_value.map(lambda v: dumps(v, True)), st.just(b'{"id":"t1"}')).map(
        lambda b: Case("cancel_topic", b, topic=CANCEL)),
    "over_packet_size": st.integers(LIMIT + PACKET_OVERHEAD + 64, 4 * LIMIT).map(
        lambda n: Case("over_packet_size", b'{"prompt":"' + b"w" * n + b'"}', silent=True)),
}
socket_only = {
    "hostile_reply_to": st.tuples(hostile_reply_to, st.sampled_from(BASES), st.booleans()).map(
        lambda v: Case("hostile_reply_to", dumps({**v[1], "reply_to": v[0]}, v[2]))),
}
mqtt_classes = {**common, **mqtt_only}
socket_classes = {**common, **socket_only}

GENERATED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=not os.environ.get("EDGED_HOSTILE_RANDOM"),
    phases=(Phase.explicit, Phase.generate),  # a failure is reported as found (the daemon's state is shared)
    suppress_health_check=list(HealthCheck),
)


def each_class_in_turn(classes: dict, run) -> None:
    """Run `run(case)` on about EXAMPLES generated inputs: each example draws one input of
    every class, so every class gets the same share."""
    kinds = sorted(classes)

    @settings(GENERATED, max_examples=-(-EXAMPLES // len(kinds)))
    @given(cases=st.tuples(*(classes[k] for k in kinds)))
    def generated(cases):
        for case in cases:
            run(case)

    generated()


# Inputs known to be dangerous, run first on every run whatever the generator draws.
EXPLICIT_MQTT = [
    Case("random_bytes", b""),
    Case("hostile_reply_to", b'{"op":"health","reply_to":"home/window/set"}', response_topic=None, v311=True),
    Case("hostile_response_topic", json.dumps(GEN).encode(), response_topic="home/door/set"),
    Case("hostile_response_topic", b'{"op":"health"}', response_topic="$SYS/x"),
    Case("hostile_response_topic", b'{"op":"health"}', response_topic=REQUEST),
    Case("hostile_response_topic", json.dumps({**GEN, "stream": True}).encode(), response_topic="r/+/x"),
    Case("hostile_reply_to", b'{"op":"health","reply_to":"home/window/set"}', response_topic=None),
    Case("hostile_reply_to", b'{"op":"health","reply_to":"a\\u0000b"}', response_topic=None),
    Case("hostile_reply_to", b'{"op":"health","reply_to":"replies/\\u0001"}', response_topic=None),
    Case("hostile_reply_to", b'{"op":"health","reply_to":"edged/testnode/request"}', response_topic=None),
    Case("hostile_reply_to", b'{"op":"health","reply_to":"' + b"r" * 10_000 + b'"}', response_topic=None),
    Case("hostile_id", b'{"op":"health","id":"\\ud800"}'),
    Case("hostile_correlation", json.dumps(GEN).encode(), corr=b"c" * 129),
    Case("deep_json", _nested(10_000, "array")),
    Case("over_packet_size", b'{"prompt":"' + b"w" * 2_000_000 + b'"}', silent=True),
]
EXPLICIT_SOCKET = [
    Case("deep_json", _nested(10_000, "array")),
    Case("hostile_id", b'{"op":"health","id":"\\ud800"}'),
    Case("random_json", b'{"prompt":"hi\\udc00","options":{"num_predict":2}}'),
    Case("random_bytes", b"\x00\xff\xfe{\n\n   \n}\x00"),
    Case("over_limit", b'{"prompt":"' + b"v" * (3 * LIMIT) + b'"}'),
]


# -- MQTT -----------------------------------------------------------------------------------


class Spy:
    """A client subscribed to everything (`#`, plus the `$` topics named above): every
    publish, by devices and by the daemon, in arrival order, with its correlation data."""

    def __init__(self, broker: Broker, *, username: str | None = None, password: str | None = None):
        self.seen: list[tuple[str, bytes, bytes | None]] = []
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"spy-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        if username:
            self.c.username_pw_set(username, password)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([("#", 1)] + [(t, 1) for t in SPY_EXTRA])
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert self.ready.wait(WAIT)

    def _on_message(self, client, userdata, msg):
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self.cond:
            self.seen.append((msg.topic, msg.payload, corr))
            self.cond.notify_all()

    def wait(self, pred, what: str, timeout: float = CASE_WAIT):
        with self.cond:
            ok = self.cond.wait_for(lambda: pred(self.seen), timeout)
            assert ok, f"timed out waiting for {what}; last: {[(t, p[:100]) for t, p, _ in self.seen[-3:]]}"

    def on(self, topic: str) -> list[bytes]:
        with self.cond:
            return [p for t, p, _ in self.seen if t == topic]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def publish(dev: Device, topic: str, payload: bytes, *, response_topic: str | None = None, corr: bytes | None = None):
    props = None
    if dev.v5:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if corr is not None:
            props.CorrelationData = corr
    info = dev.c.publish(topic, payload, qos=1, properties=props)
    assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
    return info


def mqtt_of(d):
    t = next(t for t in d.server.transports if t.name == "mqtt")
    wait_for(lambda: t.connected.is_set(), what="daemon connected to the broker")
    return t


def daemon_frames(seen, start: int, end: int | None = None) -> list[tuple[str, object, bytes]]:
    """Frames the daemon published in seen[start:end], probe answers and retained or
    periodic topics left out: (topic, decoded frame or the raw payload, raw payload)."""
    out = []
    for topic, payload, _ in seen[start:end]:
        if device_input(topic) or topic == PROBE_TOPIC or topic in DAEMON_TOPICS - {ERROR}:
            continue
        try:
            frame = json.loads(payload)
        except ValueError:
            frame = payload
        out.append((topic, frame, payload))
    return out


def is_final(frame) -> bool:
    return isinstance(frame, dict) and frame.get("done") is True


def probe_answered(tag: str):
    def pred(seen):
        for topic, payload, _ in reversed(seen):
            if topic == PROBE_TOPIC and json.loads(payload).get("id") == tag:
                return True
        return False

    return pred


def broker_max_packet_size() -> int:
    """The max_packet_size line of examples/mosquitto.conf."""
    m = re.search(r"^max_packet_size (\d+)", (REPO / "examples" / "mosquitto.conf").read_text(), re.M)
    assert m, "examples/mosquitto.conf sets max_packet_size"
    return int(m.group(1))


def oversize_publish(broker: Broker, case: Case) -> None:
    """Publish an over-size input as a one-shot device (mosquitto_pub): a broker with
    max_packet_size disconnects it on arrival, so it never reaches the daemon."""
    argv = ["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", case.topic, "-s"]
    if case.response_topic:
        argv += ["-D", "publish", "response-topic", case.response_topic]
    subprocess.run(argv, input=case.payload, capture_output=True, timeout=WAIT)


def test_generated_hostile_mqtt_inputs(start_daemon, tmp_path):
    # The broker refuses publishes over edged's packet size on arrival, as examples/mosquitto.conf
    # has it (see test_oversize_publishes_on_a_broker_without_max_packet_size).
    assert broker_max_packet_size() == Config().max_request_bytes + PACKET_OVERHEAD  # in step with the default
    extra = ("allow_anonymous true", f"max_packet_size {LIMIT + PACKET_OVERHEAD}")
    with Broker(tmp_path / "broker", extra=extra) as broker:
        d = start_daemon(broker=broker, **HOSTILE_CFG)
        _generated_mqtt(d, broker)


def _generated_mqtt(d, broker: Broker) -> None:
    t = mqtt_of(d)
    spy = Spy(broker)
    hostile, hostile311 = Device(broker).connect(), Device(broker, v5=False).connect()
    tried: list[tuple[Case, int]] = []  # each input and where its window starts in spy.seen
    sent = 0  # device publishes, every one of which the spy must see once

    def run(case: Case) -> None:
        nonlocal sent
        n = len(tried)
        # Inputs meant to reach the daemon stay clear of the packet size (topic and properties included).
        size = len(case.payload) + len(case.topic.encode()) + len((case.response_topic or "").encode("utf-8", "replace"))
        assert case.silent or size + len(case.corr or b"") + 64 < LIMIT + PACKET_OVERHEAD, case
        with spy.cond:
            start = len(spy.seen)
        tried.append((case, start))
        dev = hostile311 if case.v311 else hostile
        if case.silent:
            oversize_publish(broker, case)
        else:
            corr = case.corr if case.kind == "hostile_correlation" else f"h{n}".encode()
            publish(dev, case.topic, case.payload, response_topic=case.response_topic, corr=corr)
            sent += 1
        # A probe from the same client right behind it: the daemon handles messages in order,
        # so once the probe is answered, anything but a generation has been answered too.
        tag = f"zz-probe-{n}"
        probe = {"op": "health", "id": tag, **({"reply_to": PROBE_TOPIC} if case.v311 else {})}
        publish(dev, REQUEST, json.dumps(probe).encode(), response_topic=PROBE_TOPIC)
        sent += 1
        spy.wait(probe_answered(tag), f"the probe after {case!r}")
        want = 0 if case.silent else 1
        spy.wait(lambda seen: sum(is_final(f) for _, f, _ in daemon_frames(seen, start)) >= want, f"the reply to {case!r}")

    for case in EXPLICIT_MQTT:
        run(case)
    each_class_in_turn(mqtt_classes, run)

    # A good device is still answered, over both request topics.
    good = Device(broker).connect()
    publish(good, REQUEST, json.dumps(GEN).encode(), response_topic=good.reply_topic, corr=b"good-1")
    publish(good, f"{REQUEST}/good", json.dumps(GEN).encode(), response_topic=good.reply_topic, corr=b"good-2")
    sent += 2
    finals = dict(good.wait_finals(2))
    assert "response" in finals[b"good-1"] and "response" in finals[b"good-2"], finals
    time.sleep(0.5)  # room for a late duplicate to show up in the last window
    with spy.cond:
        seen = list(spy.seen)

    # Exactly one final frame per input (none over the packet size), each a clear reply.
    counts: Counter = Counter()
    bounds = [s for _, s in tried] + [len(seen)]
    for i, (case, start) in enumerate(tried):
        frames = [(tp, f, raw) for tp, f, raw in daemon_frames(seen, start, bounds[i + 1]) if tp != good.reply_topic]
        finals = [(tp, f) for tp, f, _ in frames if is_final(f)]
        assert len(finals) == (0 if case.silent else 1), (case, finals)
        assert all(isinstance(f, dict) for _, f, _ in frames), (case, frames)  # every publish is a JSON frame
        outcome = "none: broker refused it" if case.silent else check_final(finals[0][1], case.payload, (case.response_topic or "").encode())
        counts[(case.kind, outcome)] += 1

    # Nothing outside the allowed topics; the request/cancel topics carry only what devices sent.
    outside = [(tp, p[:80]) for tp, p, _ in seen if not device_input(tp) and not allowed_output(tp)]
    from_devices = sum(device_input(tp) for tp, _, _ in seen)
    print_table(f"MQTT: {len(tried)} hostile inputs ({len(EXPLICIT_MQTT)} explicit), by class and answer", counts)
    print(f"  publishes outside the allowed topics: {len(outside)}; on request/cancel topics: {from_devices} "
          f"(devices sent {sent}); daemon connections: {t.connects}")
    assert outside == []
    assert from_devices == sent
    assert len(tried) >= min(200, EXAMPLES) + len(EXPLICIT_MQTT)
    assert t.connects == 1  # never knocked off the broker
    for c in (hostile, hostile311, good, spy):
        c.close()


def test_generated_hostile_socket_inputs(start_daemon):
    d = start_daemon(**HOSTILE_CFG)
    counts: Counter = Counter()
    tried = 0
    with d.client() as c:

        def finals_until(tag: str, want: int) -> list[dict]:
            """Final frames until the probe `tag` is answered and at least `want` others came."""
            got, probe = [], False
            while not probe or len(got) < want:
                f = c.read()  # EOF raises: the connection must stay open
                if f.get("done"):
                    if f.get("id") == tag:
                        probe = True
                    else:
                        got.append(f)
            return got

        extra: list = []  # finals that arrived after their input's window closed

        def run(case: Case) -> None:
            nonlocal tried
            tried += 1
            data = case.payload + b"\n"
            lines = [ln for ln in data.split(b"\n") if ln.strip()]
            tag = f"zz-probe-{tried}"
            c.sock.sendall(data + json.dumps({"op": "health", "id": tag}).encode() + b"\n")
            got = finals_until(tag, len(lines))
            extra.extend(got[len(lines):])
            assert len(got) == len(lines), (case, got)
            for f in got:
                counts[(case.kind, check_final(f, case.payload))] += 1
            if not lines:
                counts[(case.kind, "blank line: no reply")] += 1

        for case in EXPLICIT_SOCKET:
            run(case)
        each_class_in_turn(socket_classes, run)
        # A last probe, then nothing else may be pending.
        c.sock.sendall(b'{"op":"health","id":"zz-last"}\n')
        extra.extend(finals_until("zz-last", 0))
        assert extra == []
        assert "response" in c.call({"id": "good-same-connection", **GEN})
    with d.client() as c2:
        assert "response" in c2.call({"id": "good-new-connection", **GEN})
    print_table(f"socket: {tried} hostile inputs ({len(EXPLICIT_SOCKET)} explicit), by class and answer "
                "(an input of several lines is answered once per line)", counts)
    assert tried >= min(200, EXAMPLES) + len(EXPLICIT_SOCKET)


def test_oversize_publishes_on_a_broker_without_max_packet_size(start_daemon, broker, device_factory):
    """Over the request cap but under the Maximum Packet Size edged announces: each is read
    and answered payload_too_large, and the daemon keeps taking requests (mosquitto 2.0.11
    would stall edged after 20 publishes it dropped at a lower announced size)."""
    d = start_daemon(broker=broker, max_request_bytes=LIMIT)
    mqtt_of(d)
    dev = device_factory().connect()
    for i in range(21):
        dev.request(b'{"prompt":"' + b"w" * (LIMIT + PACKET_OVERHEAD + 100) + b'"}', corr=f"big-{i}".encode())
    dev.request({"op": "health"}, corr=b"after")
    finals = dict(dev.wait_finals(22))
    assert finals[b"after"]["health"] == "ok"
    assert all(finals[f"big-{i}".encode()]["error"]["code"] == "payload_too_large" for i in range(21))


def test_a_retained_request_runs_once(start_daemon, broker, device_factory):
    dev = device_factory().connect()
    planted = {"prompt": "hi", "options": {"num_predict": 2}, "reply_to": dev.reply_topic}
    dev.c.publish(REQUEST, json.dumps(planted), qos=1, retain=True).wait_for_publish(WAIT)
    spy = Spy(broker)
    for i in range(2):  # two starts of the daemon
        d = start_daemon(broker=broker)
        mqtt_of(d)
        _sync(dev, spy, f"start-{i}")
        d.stop()
    time.sleep(0.3)
    assert len(dev.finals()) <= 1, dev.finals()


# -- the specific attacks -------------------------------------------------------------------


def _sync(dev: Device, spy: Spy, tag: str) -> None:
    """Until the daemon has handled everything `dev` sent before this call."""
    publish(dev, REQUEST, json.dumps({"op": "health", "id": tag}).encode(), response_topic=PROBE_TOPIC)
    spy.wait(probe_answered(tag), tag)


def _errors(spy: Spy) -> list[dict]:
    return [json.loads(p) for p in spy.on(ERROR)]


def test_actuator_response_topic_is_refused_onto_the_error_topic(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_of(d)
    spy = Spy(broker)
    dev = device_factory().connect()
    publish(dev, REQUEST, json.dumps({**GEN, "id": "door"}).encode(), response_topic="home/door/set", corr=b"k")
    spy.wait(lambda seen: any(t == ERROR for t, _, _ in seen), "the refusal on the error topic")
    _sync(dev, spy, "after-door")
    [err] = _errors(spy)
    assert err["id"] == "door" and err["error"]["code"] == "reply_topic_refused", err
    assert "home/door/set" in err["error"]["message"]
    assert spy.on("home/door/set") == []
    assert d.server.scheduler.completed == 0  # refused before it was queued: never run


def test_actuator_reply_to_on_health_is_refused(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_of(d)
    spy = Spy(broker)
    dev = device_factory(v5=False).connect()  # an MQTT 3.1.1 device: the reply address is in the payload
    dev.request({"op": "health", "id": "w", "reply_to": "home/window/set"})
    spy.wait(lambda seen: any(t == ERROR for t, _, _ in seen), "the refusal on the error topic")
    [err] = _errors(spy)
    assert err["id"] == "w" and err["error"]["code"] == "reply_topic_refused", err
    time.sleep(0.2)
    assert spy.on("home/window/set") == []


def test_u0000_in_reply_to_is_refused_and_the_daemon_stays_connected(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    t = mqtt_of(d)
    spy = Spy(broker)
    dev = device_factory().connect()
    for i, bad in enumerate(["a\x00b", "replies/\x01", "replies/\x7f", "replies/\ufffe"]):
        publish(dev, REQUEST, json.dumps({"op": "health", "id": f"z{i}", "reply_to": bad}).encode())
    spy.wait(lambda seen: sum(tp == ERROR for tp, _, _ in seen) == 4, "four refusals")
    for i, err in enumerate(_errors(spy)):
        assert err["id"] == f"z{i}" and err["error"]["code"] == "invalid_request" and err["error"]["field"] == "reply_to"
    assert "U+0000" in _errors(spy)[0]["error"]["message"]
    time.sleep(2.5)  # longer than the daemon's reconnect delay here: a dropped connection would have come back by now
    _sync(dev, spy, "after-nul")
    publish(dev, REQUEST, json.dumps(GEN).encode(), response_topic=dev.reply_topic, corr=b"still")
    [(_, f)] = dev.wait_finals(1)
    assert "response" in f
    assert t.connects == 1 and t.connected.is_set()
    assert spy.on(f"{NODE}/status") == [b"online"]  # no `offline` last will, no second `online`


def test_wildcard_response_topic_is_refused_and_another_devices_stream_completes(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_of(d)
    gate = Gate(at=1)  # holds the other device's stream after its first token while the bad request arrives
    d.server.scheduler.token_hooks.append(gate)
    spy = Spy(broker)
    other, bad = device_factory().connect(), device_factory().connect()
    other.request({"id": "s", "prompt": "tell me a story", "stream": True, "options": {"num_predict": 12}}, corr=b"s")
    assert gate.reached.wait(WAIT)
    publish(bad, REQUEST, json.dumps({**GEN, "id": "wild", "stream": True}).encode(), response_topic="r/+/x", corr=b"w")
    spy.wait(lambda seen: any(t == ERROR for t, _, _ in seen), "the refusal")
    gate.release.set()
    [(_, final)] = other.wait_finals(1)
    [err] = _errors(spy)
    assert err["id"] == "wild" and err["error"]["code"] == "invalid_request" and err["error"]["field"] == "reply_to"
    assert "response" in final and final["done_reason"] in ("stop", "length") and final["eval_count"] >= 1, final
    deltas = [f for _, f in other.frames if "delta" in f]
    assert "".join(f["delta"] for f in deltas) == final["response"]
    assert [f["seq"] for f in deltas] == list(range(1, len(deltas) + 1))
    assert not [tp for tp, _, _ in spy.seen if tp.startswith("r/")]
    assert not gate.timed_out


def test_ten_thousand_levels_of_nesting_is_malformed_on_both_transports(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    t = mqtt_of(d)
    deep = _nested(10_000, "array")
    deep_obj = b'{"op":"health","id":"n","x":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"
    dev = device_factory().connect()
    dev.request(deep, corr=b"deep-1")
    dev.request(deep_obj, corr=b"deep-2")
    dev.request(GEN, corr=b"after")
    finals = dict(dev.wait_finals(3))
    for key in (b"deep-1", b"deep-2"):
        assert finals[key]["error"]["code"] == "malformed_request", finals[key]
        assert "32" in finals[key]["error"]["message"]
    assert "response" in finals[b"after"] and t.connects == 1
    with d.client() as c:
        c.sock.sendall(deep + b"\n")
        f = c.read()
        assert f["id"] is None and f["error"]["code"] == "malformed_request", f
        c.sock.sendall(deep_obj + b"\n")
        assert c.read()["error"]["code"] == "malformed_request"
        assert "response" in c.call({"id": "same-connection", **GEN})  # the connection was kept


def test_over_long_correlation_data_is_malformed(start_daemon, broker, device_factory):
    d = start_daemon(broker=broker)
    mqtt_of(d)
    dev = device_factory().connect()
    for corr in (b"x" * 129, bytes(range(256)) * 20):
        dev.request({**GEN, "id": f"long-{len(corr)}"}, corr=corr)
    dev.request({**GEN, "id": "exact"}, corr=b"y" * 128)  # at the limit: accepted, echoed
    finals = dev.wait_finals(3)
    by_id = {f["id"]: (c, f) for c, f in finals}
    for n in (129, 5120):
        corr, f = by_id[f"long-{n}"]
        assert f["error"]["code"] == "malformed_request" and "128" in f["error"]["message"], f
        assert corr is None  # not echoed: it is not ours to repeat
    corr, f = by_id["exact"]
    assert corr == b"y" * 128 and "response" in f


# -- the example ACL ------------------------------------------------------------------------

ACL_EXAMPLE = REPO / "examples" / "mosquitto-acl.conf"
USERS = {"edged": "edged-secret", "sensor1": "s1-secret", "sensor2": "s2-secret", "observer": "obs-secret"}


def _acl_broker(tmp_path) -> Broker:
    """mosquitto with password_file and the shipped ACL (plus an `observer` login that may
    read everything, so the test can see what the ACL stopped)."""
    conf_dir = tmp_path / "acl"
    conf_dir.mkdir()
    passwd = conf_dir / "passwd"
    for i, (user, pw) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, pw], check=True,
                       capture_output=True)  # fmt: skip
    acl = conf_dir / "acl"
    acl.write_text(ACL_EXAMPLE.read_text() + "\n# test only\nuser observer\ntopic read #\n")
    return Broker(tmp_path / "broker-acl", extra=("allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}",
                                                   f"max_packet_size {broker_max_packet_size()}"))


def _login(broker: Broker, user: str, reply_topic: str, *subs: str) -> Device:
    dev = Device(broker, client_id=f"{user}-{time.monotonic_ns()}")
    dev.c.username_pw_set(user, USERS[user])
    dev.reply_topic = reply_topic
    return dev.connect(*subs)


def test_daemon_and_devices_under_the_example_acl(start_daemon, tmp_path):
    pw_file = tmp_path / "edged-mqtt-password"
    pw_file.write_text(USERS["edged"] + "\n")
    with _acl_broker(tmp_path) as broker:
        # A config that (wrongly) allows an actuator topic: the broker still refuses it.
        d = start_daemon(broker=broker, mqtt={"username": "edged", "password_file": str(pw_file),
                                              "reply_topics": ["replies/#", "home/#"]})
        t = mqtt_of(d)
        spy = Spy(broker, username="observer", password=USERS["observer"])
        spy.wait(lambda seen: (f"{NODE}/status", b"online", None) in seen, "the daemon's retained online status")
        s1 = _login(broker, "sensor1", "replies/sensor1/x", "replies/sensor2/#")  # the second: not its own
        s2 = _login(broker, "sensor2", "replies/sensor2/x")

        # Its own device topic: answered.
        publish(s1, f"{REQUEST}/sensor1", json.dumps({**GEN, "id": "mine"}).encode(), response_topic="replies/sensor1/x")
        [(_, f)] = s1.wait_finals(1)
        assert f["id"] == "mine" and "response" in f
        # Another device's topic, or the plain request topic: the broker drops it, nothing answers.
        publish(s1, f"{REQUEST}/sensor2", json.dumps({**GEN, "id": "spoof"}).encode(), response_topic="replies/sensor1/x")
        publish(s1, REQUEST, json.dumps({**GEN, "id": "plain"}).encode(), response_topic="replies/sensor1/x")
        # Replies to an actuator topic the daemon's config allowed: the broker refuses edged's publish.
        publish(s1, f"{REQUEST}/sensor1", json.dumps({**GEN, "id": "door"}).encode(), response_topic="home/door/set")
        publish(s1, f"{REQUEST}/sensor1", json.dumps({**GEN, "id": "after"}).encode(), response_topic="replies/sensor1/x")
        wait_for(lambda: any(f.get("id") == "after" for _, f in s1.finals()), what="the answer after the refused ones")
        # sensor2 is answered on its own topics; sensor1 cannot listen in.
        publish(s2, f"{REQUEST}/sensor2", json.dumps({**GEN, "id": "two"}).encode(), response_topic="replies/sensor2/x")
        [(_, f2)] = s2.wait_finals(1)
        assert f2["id"] == "two" and "response" in f2
        time.sleep(0.3)

        assert sorted(f["id"] for _, f in s1.finals()) == ["after", "mine"]
        assert [tp for tp, _ in s1.raw if tp.startswith("replies/sensor2/")] == []
        assert len(spy.on("replies/sensor2/x")) == 1  # it was published; sensor1 may not read it
        assert spy.on(f"{REQUEST}/sensor2") == [json.dumps({**GEN, "id": "two"}).encode()]  # not sensor1's spoof
        assert spy.on(REQUEST) == []
        assert spy.on("home/door/set") == []  # edged published it; the broker refused it
        assert d.server.scheduler.completed == 4  # mine, door, after, two: the dropped ones never ran
        assert t.connects == 1 and t.connected.is_set()
        outside = [tp for tp, _, _ in spy.seen if not device_input(tp) and not allowed_output(tp)]
        assert outside == []
