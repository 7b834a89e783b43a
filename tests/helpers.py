"""What the tests start and talk to, defined once; the fixtures in the conftest files use it.

- Broker: Debian's mosquitto on a free port with its own config file.
- daemon_config: a daemon's config as a dict (tiny model, socket path short enough for
  AF_UNIX, MQTT to a Broker).
- DaemonThread: a `Server` on its own event loop in a thread (for tests that reach into
  the scheduler); DaemonProcess: a real `edged serve --config FILE` (signals, sd_notify, logs).
- Device: a paho client, MQTT 5 or 3.1.1, doing request/response as an IoT device does.
- NotifyListener: a real sd_notify endpoint. Gate: a token hook that holds the worker.
- free_port, listening, wait_for, read_finals, unix_path, edged_exe, edged_cli.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
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

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_HOME = Path(os.environ.get("EDGED_TEST_HOME", REPO / ".cache" / "test-home"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT = 120.0  # a generous upper bound for waits; never an assertion about speed


def edged_exe() -> str:
    """The `edged` console script of the interpreter running the tests."""
    return str(Path(sys.executable).with_name("edged"))


def edged_cli(*args, home: Path, timeout: float = 900, input: str | None = None, check: bool = False):
    """Run the real `edged` console script with EDGED_HOME=home."""
    env = {**os.environ, "EDGED_HOME": str(home)}
    return subprocess.run(
        [edged_exe(), *args], env=env, capture_output=True, text=True, timeout=timeout, input=input, check=check
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_for(pred, what: str = "condition", timeout: float = WAIT):
    """Poll pred until it returns something true, and return that."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def read_finals(client: SocketClient, n: int) -> dict:
    """Read one connection's frames until n final frames came; those, by request id."""
    finals = {}
    while len(finals) < n:
        f = client.read()
        if f.get("done"):
            finals[f["id"]] = f
    return finals


_short_dirs: set[Path] = set()


def _remove_short_dirs() -> None:
    for d in _short_dirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_remove_short_dirs)


def unix_path(tmp: Path, name: str) -> str:
    """A path for an AF_UNIX socket: tmp/name, or when that is too long for sun_path (108
    bytes with its NUL) the same name in a short directory under /tmp named after tmp, so
    one tmp always gives the same path. The short directories go when the test run ends."""
    path = Path(tmp) / name
    if len(os.fsencode(path)) <= 100:
        return str(path)
    short = Path("/tmp") / f"edged-t-{hashlib.sha1(os.fsencode(tmp)).hexdigest()[:10]}"
    short.mkdir(exist_ok=True)
    _short_dirs.add(short)
    return str(short / name)


class Broker:
    """Debian's mosquitto with its own config file, persistence and log in `tmp`, listening on
    a free port of 127.0.0.1. `extra` replaces `allow_anonymous true` with other lines
    (password_file, acl_file, TLS). The port stays the same across stop/start."""

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

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            return listening(self.port)

        wait_for(up, what="mosquitto to listen")
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        """SIGTERM by default: mosquitto saves its sessions and queued messages."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=WAIT)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def daemon_config(tmp: Path, models_dir=None, *, broker: Broker | None = None, **over) -> dict:
    """A daemon's config as a dict: the tiny model from models_dir, one engine thread, the
    model kept loaded, the socket under tmp, MQTT to `broker` as node "testnode" (off
    without a broker). Overrides: `key=value`, `section={...}` (merged into the section)
    or `section__key=value`."""
    data: dict = {
        "model": "tiny",
        "models_dir": str(models_dir) if models_dir else None,
        "engine": {"threads": 1},
        "keep_alive": -1,
        "shutdown_grace": 5.0,
        "socket": {"path": unix_path(tmp, "run/edged.sock")},
        "mqtt": {"enabled": broker is not None, "node": "testnode", "port": broker.port if broker else 1883,
                 "host": "127.0.0.1", "reconnect_min_delay": 1.0, "reconnect_max_delay": 1.0},
    }  # fmt: skip
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    # One journal per node under tmp: a restarted daemon finds its own, two boards never share one.
    data["mqtt"].setdefault("journal", str(tmp / f"mqtt-journal-{data['mqtt'].get('node')}.sqlite3"))
    return data


class DaemonThread:
    """A Server on its own event loop in a thread (no signal handlers). The server exists from
    the constructor on, so a test can add hooks or attach the ops layer before start()."""

    def __init__(self, cfg: dict, *, engine=None, store=None):
        self.config = from_dict(cfg)
        self.server = Server(self.config, store=store, engine=engine)
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.server.serve(install_signals=False))
        except BaseException as e:  # raised by start() when it happens before ready
            self.error = e
            self._ready.set()

    def start(self) -> "DaemonThread":
        # last in on_ready, so that what the test attached has seen the ready server too
        self.server.on_ready.append(lambda server: self._ready.set())
        self.thread.start()
        assert self._ready.wait(WAIT), "daemon did not become ready"
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.request_stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "daemon did not stop"

    def __enter__(self) -> "DaemonThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def socket_path(self) -> str:
        return self.config.socket.path

    def client(self) -> SocketClient:
        return SocketClient(self.socket_path, timeout=WAIT)

    def call(self, obj: dict) -> dict:
        """One request on a fresh connection; its final frame."""
        with self.client() as c:
            return c.call(obj)


class DaemonProcess:
    """A real `edged serve --config FILE` process with stdout and stderr in a log file in tmp.
    Inherited systemd variables (NOTIFY_*, WATCHDOG_*, LISTEN_*) are dropped, so only what
    `env` sets reaches it (NOTIFY_SOCKET of a NotifyListener, say); EDGED_HOME is tmp/home
    unless `env` names one. `argv_prefix` runs it under a wrapper (systemd-socket-activate,
    a shell that enters a cgroup first); other keywords go to Popen (pass_fds)."""

    def __init__(self, tmp: Path, cfg: dict, *, env: dict | None = None, argv_prefix=(), **popen):
        tag = uuid.uuid4().hex[:6]
        self.cfg = cfg
        self.cfg_path = tmp / f"edged-{tag}.yaml"
        self.log_path = tmp / f"edged-{tag}.log"
        self.write_config(cfg)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
        full_env.update({"EDGED_HOME": str(tmp / "home"), **(env or {})})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*argv_prefix, edged_exe(), "serve", "--config", str(self.cfg_path)],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT, **popen,
        )  # fmt: skip

    def write_config(self, cfg: dict) -> None:
        self.cfg_path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))

    def wait_ready(self, path: str | None = None) -> "DaemonProcess":
        """Until the daemon answers `health` on its socket (the config's unless `path`)."""
        path = path or self.cfg["socket"]["path"]

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.logtext()[-2000:]}")
            try:
                with SocketClient(path, timeout=5) as c:
                    return c.call({"op": "health"}).get("health") == "ok"
            except Exception:
                return False

        wait_for(ready, what="daemon to answer health")
        return self

    def logtext(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        """Send sig and return the exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(WAIT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class Device:
    """A paho client that behaves like an IoT device doing request/response. Every message
    is kept: `raw` as (topic, payload), `frames` as (correlation data, decoded JSON) and
    `messages` as (topic, decoded JSON object)."""

    def __init__(self, broker: Broker, *, v5: bool = True, client_id: str | None = None, clean: bool = True):
        self.broker = broker
        self.v5 = v5
        self.id = client_id or f"dev-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"devices/{self.id}/reply"
        self.frames: list[tuple[bytes | None, dict]] = []
        self.messages: list[tuple[str, dict]] = []
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
        client.subscribe([(self.reply_topic, 1)] + [(t, 1) for t in self.extra_subs])

    def _on_message(self, client, userdata, msg):
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self.cond:
            self.raw.append((msg.topic, msg.payload))
            try:
                frame = json.loads(msg.payload)
            except ValueError:
                pass
            else:
                self.frames.append((corr, frame))
                if isinstance(frame, dict):
                    self.messages.append((msg.topic, frame))
            self.cond.notify_all()

    def connect(self, *subs: str) -> "Device":
        """Connect, subscribe to the reply topic and `subs`, and wait for the SUBACK."""
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
        """Publish at QoS 1; on MQTT 5 with Response Topic (unless response=False),
        Correlation Data and Message Expiry as given."""
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
            return [(c, f) for c, f in self.frames if isinstance(f, dict) and f.get("done")]

    def wait_finals(self, n: int, timeout: float = WAIT):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.finals()) >= n, timeout)
        assert ok, f"expected {n} final frames, got {len(self.finals())}: {self.frames[-3:]}"
        return self.finals()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class NotifyListener:
    """A real sd_notify endpoint: a bound AF_UNIX datagram socket collecting messages."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self.cv = threading.Condition()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.cv:
                self.messages.append((time.monotonic(), fields))
                self.cv.notify_all()

    def wait(self, pred, timeout: float = WAIT, what: str = "a notify message") -> tuple[float, dict]:
        """The first message (from the start) satisfying pred."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                for t, m in self.messages:
                    if pred(m):
                        return t, m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.messages[-10:]}")
                self.cv.wait(left)

    def count(self, key: str, since: float = 0.0) -> int:
        with self.cv:
            return sum(1 for t, m in self.messages if key in m and t >= since)

    def close(self):
        self._stop = True
        self._t.join(timeout=2)
        self.sock.close()


class Gate:
    """A token hook that holds the worker at token `at` until released (or the job is
    cancelled, or WAIT passes); `seen` maps each request id to the last token number."""

    def __init__(self, at: int = 1):
        self.at = at
        self.release = threading.Event()
        self.reached = threading.Event()
        self.seen: dict = {}
        self.timed_out = False

    def __call__(self, job, n):
        self.seen[job.rid] = n
        if n == self.at and not self.release.is_set():
            self.reached.set()
            end = time.monotonic() + WAIT
            while not (self.release.is_set() or job.cancel.is_set()) and time.monotonic() < end:
                self.release.wait(0.01)
            self.timed_out = not (self.release.is_set() or job.cancel.is_set())
