"""MQTT 5 request/response (paho-mqtt 2.x), with an MQTT 3.1.1 fallback.

Topics (prefix `edged`, node = hostname by default):
    <prefix>/<node>/request    requests in (QoS 1)
    <prefix>/<node>/request/<device>   the same, with the requester named by the topic
                               (a broker ACL ties <device> to the device's login)
    <prefix>/<node>/cancel[/<device>]  {"id": "..."} cancels the sender's own request
    <prefix>/<node>/status     retained "online"; "offline" is the last will
    <prefix>/<node>/info       retained birth payload (model, quantization, ...)
    <prefix>/<node>/telemetry  periodic queue depth, tokens/s, memory, governor
    <prefix>/<node>/error      errors for requests that gave no reply address

Replies go to the request's Response Topic with its Correlation Data echoed
(MQTT 5), or to `reply_to` from the JSON payload (3.1.1), only when that topic
passes the reply policy (topics.py); otherwise the error goes to the error topic. One final message by
default; with "stream": true, delta messages first. Frames are the socket's
(edged/protocol.py). Each message's requester is a `Peer` named by its reply
topic: ids, duplicates and cancels are per reply topic.

Delivery: fixed client id, clean_start false and a session expiry, so the
broker queues requests while we restart. Messages are acknowledged by hand
once they are queued or answered: a request that arrives while we stop is left
unacknowledged, and the broker hands it to the next run. Every generation is
recorded in the journal (journal.py, SQLite) before its acknowledgement and
closed when its final frame is sent: at start, what was acknowledged but never
answered (a crash, a power cut) runs again, and a redelivered copy is ignored
while the first runs, or gets the stored final frame, across restarts too. A
final frame stays in the journal's outbox until the broker acknowledges it
(PUBACK): at start, finals that a crash caught in paho's queue are published
again. The broker may then get one a second time (the crash came between its
PUBACK and our record of it): the same bytes, at least once, as QoS 1 promises;
the prompt never runs twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edged import __version__, protocol
from edged.errors import DuplicateRequest, EdgedError, MalformedRequest, RequestError, ShuttingDown, Unavailable
from edged.logs import Repeats
from edged.paths import edged_home
from edged.transports import Transport
from edged.transports.journal import Entry, Journal
from edged.transports.routes import Routes
from edged.transports.topics import ReplyPolicy

# Room for the fixed header, topic and properties of a PUBLISH around the payload cap.
PACKET_OVERHEAD = 4096

log = logging.getLogger("edged.mqtt")


class MqttTransport(Transport):
    name = "mqtt"

    def __init__(self, server):
        super().__init__(server)
        cfg = server.config.mqtt
        self.base = f"{cfg.prefix}/{cfg.node}"
        self.request_topic = f"{self.base}/request"
        self.cancel_topic = f"{self.base}/cancel"
        self.status_topic = f"{self.base}/status"
        self.info_topic = f"{self.base}/info"
        self.telemetry_topic = f"{self.base}/telemetry"
        self.error_topic = f"{self.base}/error"
        self.connected = threading.Event()
        self.accepting = True
        self.connects = 0
        self.journal = Journal(cfg.journal or edged_home() / "mqtt-journal.sqlite3", synchronous=cfg.journal_sync,
                               max_answers=cfg.dedup_size, max_answer_bytes=cfg.dedup_bytes)
        self._telemetry: asyncio.Task | None = None
        self.repeats = Repeats()
        self.routes = Routes(self)
        self._route_filters = self.routes.filters()
        # Final frames on their way to the broker: mid -> journal key, until the PUBACK.
        self._outbox: dict[int, int] = {}
        self._outbox_lock = threading.Lock()
        self._publishing = 0  # finals inside client.publish(), whose mid is not known yet
        self._acked_early: set[int] = set()  # PUBACKs that came before their mid was recorded
        self.client = self._make_client()

    @property
    def policy(self) -> ReplyPolicy:
        cfg = self.cfg
        return ReplyPolicy(cfg.reply_topics, own_prefix=cfg.prefix, max_chars=cfg.max_topic_chars)

    def subscriptions(self) -> list[str]:
        cfg = self.cfg
        if cfg.shared_group and not cfg.pool_topic:
            # Every board in the group shares <prefix>/+/request (see docs/protocol.md).
            subs = [] if cfg.require_device else [f"$share/{cfg.shared_group}/{cfg.prefix}/+/request"]
            if cfg.device_topics or cfg.require_device:
                subs.append(f"$share/{cfg.shared_group}/{cfg.prefix}/+/request/+")
            return subs
        subs = [] if cfg.require_device else [self.request_topic]
        if cfg.device_topics or cfg.require_device:
            subs.append(f"{self.request_topic}/+")
        if cfg.pool_topic:
            subs.append(f"$share/{cfg.shared_group or 'edged'}/{cfg.pool_topic}")
        subs.append(self.cancel_topic)
        if cfg.device_topics or cfg.require_device:
            subs.append(f"{self.cancel_topic}/+")
        return subs + self.routes.filters()

    def device_of(self, topic: str) -> str | None:
        """The <device> level of a per-device request or cancel topic, else None."""
        parts = topic.split("/")
        if len(parts) >= 4 and parts[-2] in ("request", "cancel") and (self.cfg.device_topics or self.cfg.require_device):
            return parts[-1]
        return None

    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.server.config.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        c.will_set(self.status_topic, "offline", qos=1, retain=True)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.broker_password())
        if cfg.tls_ca or cfg.tls_cert:
            c.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if cfg.tls_insecure:
                c.tls_insecure_set(True)
        c.reconnect_delay_set(min_delay=max(1, int(cfg.reconnect_min_delay)), max_delay=max(1, int(cfg.reconnect_max_delay)))
        c.max_queued_messages_set(0)  # replies made while the broker is away wait here, then go out
        # Every paho callback is guarded: an exception in one would end paho's network thread.
        c.on_connect = self._guard(self._on_connect)
        c.on_connect_fail = self._guard(self._on_connect_fail)
        c.on_disconnect = self._guard(self._on_disconnect)
        c.on_message = self._guard(self._on_message)
        c.on_publish = self._guard(self._on_publish)
        return c

    def _guard(self, fn):
        def guarded(*args):
            try:
                fn(*args)
            except Exception:
                self.repeats.error(log, fn.__name__, "MQTT: %s failed", fn.__name__, exc_info=True)

        return guarded

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry
        # The broker drops publishes over this before they reach us: memory stays bounded and a
        # huge payload cannot crash-loop the daemon through redelivery. Why not the request cap
        # itself: mosquitto 2.0.11 keeps one of our in-flight slots for every publish it drops
        # for us, so after max_inflight_messages (20) such drops nothing reaches us until we
        # reconnect. Between the request cap and this ceiling a request is read and answered
        # payload_too_large; the broker's own max_packet_size (examples/mosquitto.conf) closes
        # the rest.
        props.MaximumPacketSize = max(self.cfg.max_packet_bytes, self.server.config.max_request_bytes + PACKET_OVERHEAD)
        self._resend()
        self._replay()
        # connect_async: a broker that is down at start is retried with backoff by the loop thread.
        self.client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=False, properties=props)
        self.client.loop_start()
        log.info("MQTT: connecting to %s:%d as %s", cfg.host, cfg.port, self.server.config.client_id)
        self._telemetry = asyncio.ensure_future(self._telemetry_loop())

    async def stop_accepting(self) -> None:
        # Stay subscribed (the persistent session keeps queueing for the next run);
        # new arrivals are left unacknowledged so the broker redelivers them.
        self.accepting = False

    def _resend(self) -> None:
        """Publish again the final frames the broker never acknowledged (the last run crashed
        with them in paho's queue). They wait there until the broker is reached."""
        unsent = self.journal.unsent()
        if unsent:
            log.warning("MQTT: %d answer(s) of the last run never reached the broker: sending them now", len(unsent))
        for key, props, frame in unsent:
            corr = props.get("correlation_data")
            peer = Requester(self, arrived_on="", payload=b"", response_topic=props.get("response_topic"),
                             corr=bytes.fromhex(corr) if corr is not None else None, expiry_at=None)
            if peer.topic is None:  # the reply policy was narrowed since: it may no longer go there
                log.warning("MQTT: answer %d not re-sent: its reply topic is no longer allowed", key)
                self._sent(key)
                continue
            self.deliver(key, lambda peer=peer, frame=frame: peer.publish(frame))

    def _replay(self) -> None:
        """Run what was acknowledged but never answered (the last run crashed or lost power).
        Replies wait in paho's queue until the broker is reached."""
        entries = self.journal.unanswered()
        if entries:
            log.warning("MQTT: %d acknowledged request(s) were not answered by the last run: running them now", len(entries))
        for entry in entries:
            try:
                self.server.receive(entry.payload, Requester.replay(self, entry))
            except Exception:
                log.exception("MQTT: replaying journal entry %d failed", entry.key)

    async def close(self) -> None:
        if self._telemetry:
            self._telemetry.cancel()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_blocking)
        self.journal.close()

    def _close_blocking(self) -> None:
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=3)
            except (RuntimeError, ValueError):
                pass
            self._flush(3)
        self.client.disconnect()
        self.client.loop_stop()

    def _flush(self, timeout: float) -> None:
        # Let queued replies reach the broker before we disconnect.
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.connected.is_set():
            with self.client._out_message_mutex:
                if not self.client._out_messages:
                    return
            time.sleep(0.01)

    def describe(self) -> dict:
        return {"broker": f"{self.cfg.host}:{self.cfg.port}", "connected": self.connected.is_set(), "node": self.cfg.node,
                "routes": self.routes.describe()}

    def reconfigure(self) -> None:
        """SIGHUP: routes are reloaded and their subscriptions follow."""
        self.routes.load(self.server.config.routes)
        new = self.routes.filters()
        gone = [f for f in self._route_filters if f not in new]
        added = [f for f in new if f not in self._route_filters]
        self._route_filters = new
        if self.connected.is_set():
            if gone:
                self.client.unsubscribe(gone)
            if added:
                opts = SubscribeOptions(qos=self.cfg.qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
                self.client.subscribe([(f, opts) for f in added])
            self.client.publish(self.info_topic, json.dumps(self.birth()), qos=1, retain=True)

    # -- paho callbacks (paho's network thread) ----------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("MQTT: broker refused the connection: %s", reason_code)
            return
        self.connects += 1
        _nodelay(client)
        self.connected.set()
        log.info("MQTT: connected (session present: %s)", flags.session_present)
        # Retained messages are not requests: a retained request would run again on every
        # start and reconnect, so the broker is asked not to send them (and they are dropped).
        opts = SubscribeOptions(qos=self.cfg.qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe([(t, opts) for t in self.subscriptions()])
        client.publish(self.status_topic, "online", qos=1, retain=True)
        client.publish(self.info_topic, json.dumps(self.birth()), qos=1, retain=True)

    def _on_connect_fail(self, client, userdata):
        cfg = self.cfg
        log.warning("MQTT: cannot connect to the broker at %s:%d; retrying every %d-%d s", cfg.host, cfg.port,
                    max(1, int(cfg.reconnect_min_delay)), max(1, int(cfg.reconnect_max_delay)))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set() and self.accepting:
            log.warning("MQTT: disconnected (%s); reconnecting with backoff", reason_code)
        self.connected.clear()

    def birth(self) -> dict:
        info = self.server.model_info
        return {
            "node": self.cfg.node,
            "model": info.get("name"),
            "quantization": info.get("quantization"),
            "context_length": info.get("context_length"),
            "threads": info.get("threads"),
            "version": __version__,
            "request_topic": self.request_topic,
            "routes": [{"name": r["name"], "topic": r["topic"], "publish": r["publish"]} for r in self.routes.describe()],
        }

    def _on_message(self, client, userdata, msg):
        if not self.accepting:
            return  # not acknowledged: the broker redelivers it to our next run
        if msg.retain:
            client.ack(msg.mid, msg.qos)
            return
        try:
            route = None if self._is_request_topic(msg.topic) else self.routes.match(msg.topic)
            if route is not None:
                self.routes.on_message(route, msg.topic, msg.payload, bool(msg.dup))
            else:
                self.server.receive(msg.payload, Requester.received(self, msg))
        except Exception:
            self.repeats.error(log, "on_message", "MQTT: failed to handle a message", exc_info=True)
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    def _is_request_topic(self, topic: str) -> bool:
        parts = topic.split("/")
        return len(parts) >= 3 and parts[0] == self.cfg.prefix and parts[2] in ("request", "cancel") or (
            self.cfg.pool_topic is not None and topic == self.cfg.pool_topic)

    def admit(self, peer: "Requester", frame: protocol.Frame) -> bool:
        """Record a generation in the journal before its message is acknowledged. A copy of
        one still queued or running is dropped; a copy of an answered one gets the stored
        final frame again: QoS 1 redelivery never runs a prompt twice."""
        if frame.id is None and peer.corr_id is not None:
            frame.id = peer.corr_id  # so it can be cancelled and deduplicated
        if frame.op not in protocol.GEN_OPS or peer.journal_key is not None:  # a replay is recorded already
            return True
        props = {"response_topic": peer.topic, "correlation_data": peer.corr.hex() if peer.corr is not None else None,
                 "expiry_at": peer.expiry_at, "device": peer.device}
        try:
            key, state, final = self.journal.begin(peer.scope, None if frame.id is None else frame.key, peer.arrived_on,
                                                   peer.payload, props)
        except Exception as e:
            self.repeats.error(log, "journal", "MQTT: the journal failed: %s", e)
            raise Unavailable("the request journal is unavailable; retry later") from None
        if state == "pending":
            log.info("MQTT: duplicate of queued or running request %r ignored", frame.id)
            return False
        if state == "answered":
            log.info("MQTT: duplicate of answered request %r: re-sending its result", frame.id)
            if final is not None:
                peer.publish(final)
            else:
                peer.send(protocol.error_frame(frame.id, DuplicateRequest(
                    "this request was answered already; its answer was too large to keep for a re-send")), True)
            return False
        peer.journal_key = key
        return True

    def finished(self, key: int, frame: dict, payload: bytes) -> bool:
        """Close a journal entry as its final frame goes out; False: keep it (and send nothing).
        The entry is closed before the publish, with the frame in its outbox until the PUBACK
        (deliver): a crash between the two re-sends the frame rather than running the prompt twice."""
        code = (frame.get("error") or {}).get("code")
        if code == ShuttingDown.code:
            return False  # stays in the journal: the next run answers it
        try:
            self.journal.finish(key, None if code else payload, outbox=payload)
        except Exception as e:
            self.repeats.error(log, "journal", "MQTT: the journal failed: %s", e)
        return True

    def deliver(self, key: int, publish) -> None:
        """publish() a final frame and clear journal entry `key`'s outbox once the broker has it.

        Why the early set: paho handles a PUBACK on its network thread, under its own lock,
        and can do so before publish() has returned the mid here; holding our lock across
        publish() instead would deadlock against that thread."""
        with self._outbox_lock:
            self._publishing += 1
        info = None
        try:
            info = publish()
        finally:
            with self._outbox_lock:
                self._publishing -= 1
                queued = info is not None and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
                done = not queued or info.mid in self._acked_early
                if queued and not done:
                    self._outbox[info.mid] = key
                if queued:
                    self._acked_early.discard(info.mid)
                if not self._publishing:
                    self._acked_early.clear()
        if done:  # acknowledged already, or it cannot be sent at all (logged by publish)
            self._sent(key)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._outbox_lock:
            key = self._outbox.pop(mid, None)
            if key is None and self._publishing:
                self._acked_early.add(mid)
        if key is not None:
            self._sent(key)

    def _sent(self, key: int) -> None:
        try:
            self.journal.sent(key)
        except Exception as e:
            self.repeats.error(log, "journal", "MQTT: the journal failed: %s", e)

    def announce(self, telemetry: dict, info: dict) -> None:
        """Publish an event on the telemetry topic and refresh the retained info with `info` added."""
        if not self.connected.is_set():
            return
        self.client.publish(self.telemetry_topic, json.dumps({**telemetry, "time": time.time()}), qos=0)
        self.client.publish(self.info_topic, json.dumps({**self.birth(), **info}), qos=1, retain=True)

    async def _telemetry_loop(self) -> None:
        while True:
            interval = self.cfg.telemetry_interval
            await asyncio.sleep(interval if interval > 0 else 5)
            if interval <= 0 or not self.connected.is_set():
                continue
            try:
                st = self.server.status()
                keys = ("queue_depth", "in_flight", "tokens_per_second", "rss_bytes", "uptime_s", "loaded", "governor")
                body = {k: st[k] for k in keys}
                body["time"] = time.time()
                self.client.publish(self.telemetry_topic, json.dumps(body), qos=0)
            except Exception:  # the loop outlives any one failure
                self.repeats.error(log, "telemetry", "MQTT: telemetry failed", exc_info=True)

    def publish(self, topic: str, payload: bytes, props: Properties, *, qos: int | None = None,
                retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish a reply; a failure is logged (once per kind, then counted) and never raised
        or retried: the topic was validated, so a failure here is the connection's."""
        try:
            info = self.client.publish(topic, payload, qos=self.cfg.qos if qos is None else qos, retain=retain,
                                       properties=props)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self.repeats.warning(log, f"publish-{info.rc}", "MQTT: publish failed: %s", mqtt.error_string(info.rc))
            return info
        except Exception as e:
            self.repeats.warning(log, f"publish-{type(e).__name__}", "MQTT: publish failed: %s", type(e).__name__)
            return None


def _nodelay(client) -> None:
    # Replies are small and back-to-back; Nagle + delayed ACK would add ~40 ms to each.
    sock = client.socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # TLS wrapper or a non-TCP transport


class Requester(protocol.Peer):
    """Where one message's frames go: its reply topic and correlation data. Its scope
    (ids, duplicates, cancels) is the device named by the topic, if any, plus the reply topic."""

    default_stream = False

    def __init__(self, t: MqttTransport, *, arrived_on: str, payload: bytes, response_topic: str | None,
                 corr: bytes | None, expiry_at: float | None, cancel: bool = False, device: str | None = None):
        self.t = t
        self.arrived_on = arrived_on
        self.payload = payload
        self.requested = response_topic
        self.topic: str | None = None  # set once the policy allows it
        self.corr = corr
        self.expiry_at = expiry_at
        self.deadline = time.monotonic() + (expiry_at - time.time()) if expiry_at is not None else None
        self.default_op = "cancel" if cancel else None
        self.device = device
        self.journal_key: int | None = None
        self._refused = None
        if self.requested is not None:  # known before the payload is decoded: errors about it go there
            try:
                self.topic = t.policy.check(self.requested)
            except EdgedError as e:
                self._refused = e
        self.corr_id = None
        if corr is not None and len(corr) <= t.cfg.max_correlation_bytes:
            try:
                self.corr_id = corr.decode()
            except UnicodeDecodeError:
                self.corr_id = corr.hex()
        self.scope = "mqtt:"

    @classmethod
    def received(cls, t: MqttTransport, msg) -> "Requester":
        props = msg.properties
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        cancel = msg.topic == t.cancel_topic or msg.topic.startswith(t.cancel_topic + "/")
        return cls(t, arrived_on=msg.topic, payload=msg.payload,
                   response_topic=getattr(props, "ResponseTopic", None) if props else None,
                   corr=getattr(props, "CorrelationData", None) if props else None,
                   expiry_at=time.time() + expiry if expiry else None, cancel=cancel, device=t.device_of(msg.topic))

    @classmethod
    def replay(cls, t: MqttTransport, entry: Entry) -> "Requester":
        p = entry.properties
        corr = p.get("correlation_data")
        peer = cls(t, arrived_on=entry.topic, payload=entry.payload, response_topic=p.get("response_topic"),
                   corr=bytes.fromhex(corr) if corr is not None else None, expiry_at=p.get("expiry_at"),
                   device=p.get("device"))
        peer.journal_key = entry.key
        return peer

    def route(self, obj: dict) -> None:
        if self.corr is not None and self.corr_id is None:
            raise MalformedRequest(f"correlation data longer than {self.t.cfg.max_correlation_bytes} bytes")
        if self._refused is not None:
            raise self._refused  # topic is None: the error goes to the error topic
        if self.topic is None:
            if obj.get("reply_to") is None:
                raise RequestError("no reply address: set the MQTT 5 Response Topic or 'reply_to' in the payload", field="reply_to")
            self.topic = self.t.policy.check(obj["reply_to"])
        who = f"device:{self.device}" if self.device is not None else ""
        self.identity = who
        self.scope = f"mqtt:{who}|{self.topic}"

    def admit(self, frame: protocol.Frame) -> bool:
        return self.t.admit(self, frame)

    def send(self, frame: dict, final: bool) -> None:
        if frame.get("id") is None and self.corr_id is not None:
            frame = {**frame, "id": self.corr_id}
        payload = protocol.encode(frame)[:-1]
        if final and self.journal_key is not None:
            if self.t.finished(self.journal_key, frame, payload):
                self.t.deliver(self.journal_key, lambda: self.publish(payload))
            return
        self.publish(payload)

    def publish(self, payload: bytes) -> mqtt.MQTTMessageInfo | None:
        props = Properties(PacketTypes.PUBLISH)
        if self.corr_id is not None:
            props.CorrelationData = self.corr
        props.ContentType = "application/json"
        return self.t.publish(self.topic or self.t.error_topic, payload, props)
