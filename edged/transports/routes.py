"""MQTT routes: a topic's raw payloads become prompts, the answers go to another topic.

A route (config `routes:`) subscribes to a topic filter. Each payload that arrives
is rendered into a prompt with the route's Jinja template (sandboxed: the payload
is a device's), sent with the route's system prompt, options and output format
through the daemon's one receive path, and the answer (the model's text: with a
JSON schema, a JSON document that validates) is published on the route's topic
template, filled from the incoming topic's levels (`alerts/{1}/summary`) and
checked by the reply policy like any reply topic.

A sensor that publishes every second must not queue a thousand prompts: per
source topic at most one request runs and one reading waits; a newer reading
replaces the waiting one (newest wins) and the replaced ones are counted as
dropped. `min_interval_s` spaces the starts per source topic. A QoS 1 redelivery
(DUP set) of the last payload seen on a topic is ignored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from jinja2 import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from paho.mqtt.client import topic_matches_sub

from edged import protocol
from edged.errors import EdgedError, RequestError, TemplateError

log = logging.getLogger("edged.routes")

_ENV = ImmutableSandboxedEnvironment(autoescape=False)


@dataclass
class _Source:
    """One source topic of a route: what runs, what waits."""

    running: bool = False
    waiting: bytes | None = None
    last_start: float = 0.0
    last_payload: bytes | None = None
    timer: threading.Timer | None = None


@dataclass
class Route:
    cfg: object  # RouteConfig
    template: object = None
    sources: dict[str, _Source] = field(default_factory=dict)
    received: int = 0
    answered: int = 0
    failed: int = 0
    dropped: int = 0  # readings replaced by a newer one before they ran

    def describe(self) -> dict:
        c = self.cfg
        return {"name": c.name, "topic": c.topic, "publish": c.publish, "received": self.received,
                "answered": self.answered, "failed": self.failed, "dropped": self.dropped}


class Routes:
    """The routes of one MQTT transport. `publish(topic, payload, qos, retain)` sends an answer."""

    def __init__(self, transport):
        self.t = transport
        self.lock = threading.Lock()
        self.routes: list[Route] = []
        self.load(transport.server.config.routes)

    def load(self, configs) -> None:
        routes = []
        for c in configs:
            try:
                template = _ENV.from_string(c.prompt)
            except JinjaTemplateError as e:  # config validation cannot compile Jinja; say which route
                log.error("route %s: the prompt template does not compile (%s); route disabled", c.name, e)
                continue
            routes.append(Route(cfg=c, template=template))
        with self.lock:
            for old in self.routes:
                for src in old.sources.values():
                    if src.timer is not None:
                        src.timer.cancel()
            self.routes = routes

    def filters(self) -> list[str]:
        return [r.cfg.topic for r in self.routes]

    def match(self, topic: str) -> Route | None:
        for r in self.routes:
            if topic_matches_sub(r.cfg.topic, topic):
                return r
        return None

    def describe(self) -> list[dict]:
        return [r.describe() for r in self.routes]

    # -- arrivals (paho's network thread) -----------------------------------------
    def on_message(self, route: Route, topic: str, payload: bytes, dup: bool) -> None:
        with self.lock:
            route.received += 1
            src = route.sources.setdefault(topic, _Source())
            if dup and payload == src.last_payload:
                return  # a QoS 1 redelivery of what we already took
            src.last_payload = payload
            if src.running or src.timer is not None:
                if src.waiting is not None:
                    route.dropped += 1
                src.waiting = payload
                return
            wait = route.cfg.min_interval_s - (time.monotonic() - src.last_start)
            if wait > 0:
                src.waiting = payload
                src.timer = threading.Timer(wait, self._start_waiting, (route, topic))
                src.timer.daemon = True
                src.timer.start()
                return
            src.running = True
            src.last_start = time.monotonic()
        self._run(route, topic, payload)

    def _start_waiting(self, route: Route, topic: str) -> None:
        with self.lock:
            src = route.sources.get(topic)
            if src is None:
                return
            src.timer = None
            payload, src.waiting = src.waiting, None
            if payload is None or src.running:
                if payload is not None:
                    src.waiting = payload
                return
            src.running = True
            src.last_start = time.monotonic()
        self._run(route, topic, payload)

    def _ended(self, route: Route, topic: str, ok: bool) -> None:
        with self.lock:
            if ok:
                route.answered += 1
            else:
                route.failed += 1
            src = route.sources.get(topic)
            if src is None:
                return
            src.running = False
            if src.waiting is None or src.timer is not None:
                return
            wait = route.cfg.min_interval_s - (time.monotonic() - src.last_start)
            src.timer = threading.Timer(max(0.0, wait), self._start_waiting, (route, topic))
            src.timer.daemon = True
            src.timer.start()

    def _run(self, route: Route, topic: str, payload: bytes) -> None:
        peer = RoutePeer(self, route, topic)
        try:
            request = self.request(route, topic, payload)
        except EdgedError as e:
            peer.send(protocol.error_frame(None, e), True)
            return
        self.t.server.receive(request, peer)

    def request(self, route: Route, topic: str, payload: bytes) -> bytes:
        """The request JSON for one payload: the rendered prompt and the route's settings."""
        c = route.cfg
        text = payload.decode("utf-8", "replace")
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        try:
            prompt = route.template.render(payload=data, text=text, topic=topic, levels=topic.split("/"))
        except Exception as e:  # SecurityError, UndefinedError, TypeError from the template
            raise TemplateError(f"route {c.name}: the prompt template failed: {type(e).__name__}") from None
        req: dict = {"prompt": prompt, "stream": False, "options": dict(c.options)}
        if c.system is not None:
            req["system"] = c.system
        if c.format is not None:
            req["format"] = c.format
        return json.dumps(req).encode()

    def output_topic(self, route: Route, topic: str) -> str:
        levels = topic.split("/")
        try:
            out = route.cfg.publish.format(*levels)
        except (IndexError, KeyError, ValueError):
            raise RequestError(f"route {route.cfg.name}: publish template {route.cfg.publish!r} does not fit topic {topic!r}") from None
        return self.t.policy.check(out)


class RoutePeer(protocol.Peer):
    """The requester of one routed payload: the route, per source topic."""

    default_stream = False

    def __init__(self, routes: Routes, route: Route, topic: str):
        self.routes = routes
        self.entry = route
        self.source = topic
        self.scope = f"route:{route.cfg.name}|{topic}"
        self.identity = self.scope  # each source topic has its own quota

    def send(self, frame: dict, final: bool) -> None:
        if not final:
            return
        t, c = self.routes.t, self.entry.cfg
        ok = "error" not in frame
        if ok and c.format is not None and frame.get("done_reason") == "length":
            # num_predict cut the JSON off: publishing it would hand devices an unparsable document
            frame = protocol.error_frame(None, RequestError(
                f"route {c.name}: the answer was cut off at num_predict before the JSON was complete", field="options.num_predict"))
            ok = False
        try:
            if ok:
                topic = self.routes.output_topic(self.entry, self.source)
                t.publish(topic, frame.get("response", "").encode(), _props(), qos=c.qos, retain=c.retain)
            else:
                body = {**frame, "route": c.name, "topic": self.source}
                t.publish(t.error_topic, protocol.encode(body)[:-1], _props())
        except EdgedError as e:  # the output topic is refused: say so where errors go
            ok = False
            body = {**protocol.error_frame(None, e), "route": c.name, "topic": self.source}
            t.publish(t.error_topic, protocol.encode(body)[:-1], _props())
        finally:
            self.routes._ended(self.entry, self.source, ok)


def _props():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    return props
