"""Small blocking clients for the two transports (used by `edged ask|status`,
the tests and the transport benchmark)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from typing import Iterator

from edged.errors import EdgedError


class SocketClient:
    """One connection to the daemon's Unix socket."""

    def __init__(self, path: str, *, timeout: float | None = 600):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise EdgedError(f"cannot connect to {path}: {e.strerror or e} (is `edged serve` running?)") from None
        self.file = self.sock.makefile("rb")

    def send(self, obj: dict) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def frames(self) -> Iterator[dict]:
        for line in self.file:
            yield json.loads(line)

    def read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise EdgedError("the daemon closed the connection")
        return json.loads(line)

    def request(self, obj: dict) -> Iterator[dict]:
        """Send one request; yield its frames up to and including the final one."""
        obj = dict(obj)
        obj.setdefault("id", uuid.uuid4().hex[:12])
        self.send(obj)
        while True:
            f = self.read()
            if f.get("id") not in (obj["id"], None):
                continue
            yield f
            if f.get("done"):
                return

    def call(self, obj: dict) -> dict:
        """Send one request; return its final frame."""
        *_, last = self.request(obj)
        return last

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def mqtt_request(
    host: str,
    port: int,
    topic: str,
    payload: dict,
    *,
    timeout: float = 600,
    on_frame=None,
    username: str | None = None,
    password: str | None = None,
) -> dict:
    """MQTT 5 request/response: publish with Response Topic + Correlation Data,
    return the final frame (deltas go to on_frame when streaming)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    cid = uuid.uuid4().hex[:12]
    reply = f"reply/edged-ask/{cid}"  # inside the default reply patterns (mqtt.reply_topics)
    done = threading.Event()
    subscribed = threading.Event()
    result: dict = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edged-ask-{cid}", protocol=mqtt.MQTTv5)
    if username:
        c.username_pw_set(username, password)

    def on_connect(client, userdata, flags, rc, props):
        client.subscribe(reply, qos=1)

    def on_subscribe(client, userdata, mid, rcs, props):
        subscribed.set()

    def on_message(client, userdata, msg):
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr is not None and corr != cid.encode():
            return
        f = json.loads(msg.payload)
        if f.get("done"):
            result.update(f)
            done.set()
        elif on_frame:
            on_frame(f)

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port)
    c.loop_start()
    try:
        if not subscribed.wait(timeout):
            raise EdgedError(f"no connection to the MQTT broker at {host}:{port}")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = cid.encode()
        c.publish(topic, json.dumps(payload), qos=1, properties=props)
        if not done.wait(timeout):
            raise EdgedError(f"no answer on {reply} within {timeout:.0f}s (is the daemon subscribed to {topic}?)")
        return result
    finally:
        c.disconnect()
        c.loop_stop()
