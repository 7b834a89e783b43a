"""Helpers for the serving tests: a real mosquitto on a free port, daemons in
a thread (mechanics) or as a real `edged serve` process (signals), and paho
clients that behave like devices."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.serve.client import SocketClient
from edged.serve.config import from_dict
from edged.serve.server import Server

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT = 60  # generous upper bound for waits; never an assertion about speed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = WAIT, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Broker:
    """Debian's mosquitto with its own config file, persistence in a tmp dir."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = ()):
        self.dir = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = tmp / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            *(extra or ("allow_anonymous true",)),
            "persistence true",
            f"persistence_location {tmp}/",
            "max_queued_messages 10000",
            f"log_dest file {tmp}/mosquitto.log",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
                return False

        wait_for(up, what="mosquitto to listen")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=WAIT)
        self.proc = None


def make_config(tmp: Path, *, broker: Broker | None = None, models_dir=None, **over):
    data: dict = {
        "model": "tiny",
        "models_dir": str(models_dir) if models_dir else None,
        "engine": {"threads": 1},
        "shutdown_grace": 5.0,
        "socket": {"path": str(tmp / "run" / "edged.sock")},
        "mqtt": {"enabled": broker is not None, "node": "testnode", "port": broker.port if broker else 1883,
                 "host": "127.0.0.1", "reconnect_min_delay": 1.0, "reconnect_max_delay": 1.0},
    }  # fmt: skip
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[key] = value
    return data


class DaemonThread:
    """A Server running on its own event loop in a thread (no signal handlers)."""

    def __init__(self, cfg_dict: dict, *, engine=None, store=None):
        self.config = from_dict(cfg_dict)
        self.server = Server(self.config, engine=engine, store=store)
        self._ready = threading.Event()
        self.server.on_ready.append(lambda s: self._ready.set())
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self):
        try:
            asyncio.run(self.server.serve(install_signals=False))
        except BaseException as e:  # surfaced by start()/stop()
            self.error = e
            self._ready.set()

    def start(self):
        self.thread.start()
        assert self._ready.wait(WAIT), "daemon did not become ready"
        if self.error:
            raise self.error
        return self

    def stop(self):
        self.server.request_stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "daemon did not stop"

    @property
    def socket_path(self) -> str:
        return self.config.socket.path

    def client(self) -> SocketClient:
        return SocketClient(self.socket_path, timeout=WAIT)


class Device:
    """A paho client that behaves like an IoT device doing request/response."""

    def __init__(self, broker: Broker, *, v5: bool = True, client_id: str | None = None, clean: bool = True):
        self.broker = broker
        self.v5 = v5
        self.id = client_id or f"dev-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"devices/{self.id}/reply"
        self.frames: list[tuple[bytes | None, dict]] = []  # (correlation, frame)
        self.raw: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=proto, **kw)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.extra_subs: list[str] = []
        self.clean = clean

    def _on_connect(self, client, userdata, flags, rc, props):
        subs = [(self.reply_topic, 1)] + [(t, 1) for t in self.extra_subs]
        client.subscribe(subs)

    def _on_message(self, client, userdata, msg):
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self.cond:
            self.raw.append((msg.topic, msg.payload))
            try:
                self.frames.append((corr, json.loads(msg.payload)))
            except ValueError:
                pass
            self.cond.notify_all()

    def connect(self, *subs: str) -> "Device":
        self.extra_subs = list(subs)
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean else 3600
            self.c.connect("127.0.0.1", self.broker.port, clean_start=self.clean, properties=props)
        else:
            self.c.connect("127.0.0.1", self.broker.port)
        self.c.loop_start()
        assert self.subscribed.wait(WAIT)
        return self

    def request(self, payload, *, corr: bytes | None = None, topic="edged/testnode/request", expiry=None, response=True):
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            if response:
                props.ResponseTopic = self.reply_topic
            if corr is not None:
                props.CorrelationData = corr
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        return self.c.publish(topic, data, qos=1, properties=props)

    def finals(self):
        with self.cond:
            return [(c, f) for c, f in self.frames if f.get("done")]

    def wait_finals(self, n: int, timeout: float = WAIT):
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(1 for _, f in self.frames if f.get("done")) >= n, timeout)
        assert ok, f"expected {n} final frames, got {len(self.finals())}: {self.frames[-3:]}"
        return self.finals()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def edged_exe() -> str:
    return str(Path(sys.executable).with_name("edged"))


class DaemonProcess:
    """A real `edged serve --config FILE` process (for signals)."""

    def __init__(self, tmp: Path, cfg: dict, *, env=None, pass_fds=(), **popen):
        self.cfg_path = tmp / f"edged-{uuid.uuid4().hex[:6]}.yaml"
        self.cfg = cfg
        self.write_config(cfg)
        self.log = tmp / "daemon.log"
        self.proc = subprocess.Popen(
            [edged_exe(), "serve", "--config", str(self.cfg_path)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
            env={**os.environ, **(env or {})},
            pass_fds=pass_fds,
            **popen,
        )

    def write_config(self, cfg: dict) -> None:
        self.cfg_path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))

    def wait_ready(self, path: str):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with SocketClient(path, timeout=5) as c:
                    return c.call({"op": "health"}).get("health") == "ok"
            except Exception:
                return False

        wait_for(ready, what="daemon to answer health")
        return self

    def logtext(self) -> str:
        return self.log.read_text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
