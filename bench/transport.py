"""Transport overhead of the daemon, with the model in-process.

    from bench.transport import run_transport_bench
    result = run_transport_bench(ModelStore(), "smollm2-135m", threads=2)

Starts a daemon in this process (socket + MQTT + HTTP on a free loopback port) and a
private mosquitto on a free port, then measures:
- overhead: client round trip minus the engine's own `total_duration`, p50/p99
  over `requests` short requests, for each transport (goal: <= 2 ms p50); HTTP is
  Ollama's POST /api/generate with `stream: false` on one keep-alive connection;
- throughput and latency with 1, 4 and 16 concurrent clients per transport,
  counting lost and duplicated replies (goal: zero).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

SHORT = {"prompt": "hi", "stream": False, "options": {"num_predict": 1, "temperature": 0}}


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return round(xs[k], 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Mosquitto:
    def __init__(self, tmp: Path):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = _free_port()
        conf = tmp / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000", "set_tcp_nodelay true"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class _MqttRequester:
    """One device: a paho client doing request/response with correlation data."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.reply = f"bench/{uuid.uuid4().hex[:8]}/reply"
        self.waiting: dict[bytes, tuple[threading.Event, list]] = {}
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        if not ready.wait(30):
            raise RuntimeError("bench client could not subscribe")
        self.c = c

    def _on_connect(self, client, *a):
        # Small back-to-back messages: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(self.reply, qos=1)

    def _on_message(self, client, userdata, msg):
        slot = self.waiting.get(msg.properties.CorrelationData)
        if slot is not None:
            slot[1].append((time.perf_counter(), json.loads(msg.payload)))
            slot[0].set()

    def call(self, payload: dict, timeout: float = 120) -> tuple[float, dict]:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        corr = uuid.uuid4().hex.encode()
        ev, box = threading.Event(), []
        self.waiting[corr] = (ev, box)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply
        props.CorrelationData = corr
        t0 = time.perf_counter()
        self.c.publish(self.topic, json.dumps(payload), qos=1, properties=props)
        if not ev.wait(timeout):
            raise TimeoutError
        t1, frame = box[0]
        return t1 - t0, frame

    def wait_answered(self, payload: dict, timeout: float = 30) -> None:
        """Ask until the daemon answers: a request published before it has subscribed is lost."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call(payload, timeout=2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon does not answer over MQTT") from None

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class _HttpRequester:
    """One HTTP client on a keep-alive connection (the standard library's), as an Ollama
    client uses it: POST /api/generate, one JSON answer. Ollama's answer has no request id,
    so the id the payload carried is put back on it: one answer per request is what is counted."""

    def __init__(self, port: int):
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, payload: dict) -> tuple[float, dict]:
        rid = payload.get("id")
        body = json.dumps({k: v for k, v in payload.items() if k != "id"}).encode()
        t0 = time.perf_counter()
        self.conn.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        rt = time.perf_counter() - t0
        frame = json.loads(data)
        if resp.status != 200:
            frame = {"error": frame.get("error")}
        if rid is not None:
            frame["id"] = rid
        return rt, frame

    def close(self):
        self.conn.close()


def _socket_call(client, payload) -> tuple[float, dict]:
    t0 = time.perf_counter()
    frame = client.call(payload)
    return time.perf_counter() - t0, frame


def _overhead(samples: list[tuple[float, dict]]) -> dict:
    over = [(rt - f["total_duration"] / 1e9) * 1000 for rt, f in samples if "total_duration" in f]
    rts = [rt * 1000 for rt, _ in samples]
    return {
        "requests": len(samples),
        "errors": sum(1 for _, f in samples if "error" in f),
        "overhead_ms_p50": _pct(over, 50),
        "overhead_ms_p99": _pct(over, 99),
        "round_trip_ms_p50": _pct(rts, 50),
        "round_trip_ms_p99": _pct(rts, 99),
        "engine_ms_p50": _pct([f["total_duration"] / 1e6 for _, f in samples if "total_duration" in f], 50),
    }


def _concurrent(make_client, call, n_clients: int, per_client: int) -> dict:
    lat: list[float] = []
    finals: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    clients = [make_client() for _ in range(n_clients)]

    def worker(k, cl):
        for j in range(per_client):
            try:
                rt, f = call(cl, {**SHORT, "id": f"c{k}-{j}"})
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                lat.append(rt * 1000)
                finals.append(f)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k, cl)) for k, cl in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for cl in clients:
        cl.close()
    ids = [f.get("id") for f in finals]
    expected = n_clients * per_client
    return {
        "clients": n_clients,
        "requests": expected,
        "throughput_rps": round(len(finals) / wall, 2),
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p99": _pct(lat, 99),
        "lost": expected - len(set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "errors": len(errors) + sum(1 for f in finals if "error" in f),
    }


def run_transport_bench(store, model_name: str, *, threads: int | None = None, requests: int = 100,
                        per_client: int = 8, clients: tuple[int, ...] = (1, 4, 16)) -> dict:
    from edged.engine.runner import EngineConfig
    from edged.models.loading import load_engine
    from edged.serve.client import SocketClient
    from edged.serve.config import from_dict
    from edged.serve.server import Server

    tmp = Path(tempfile.mkdtemp(prefix="edged-bench-"))
    broker = None
    loop = asyncio.new_event_loop()
    daemon = threading.Thread(target=loop.run_forever, name="bench-daemon", daemon=True)
    try:
        broker = _Mosquitto(tmp)
        http_port = _free_port()
        engine = load_engine(model_name, config=EngineConfig(threads=threads), store=store)
        cfg = from_dict(
            {
                "model": model_name,
                "models_dir": str(store.root),
                "queue_size": 256,
                "keep_alive": -1.0,
                "engine": {"threads": threads},
                "socket": {"path": str(tmp / "edged.sock")},
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "node": "bench", "telemetry_interval": 0.0,
                         "journal": str(tmp / "mqtt-journal.sqlite3")},
                "http": {"enabled": True, "port": http_port, "unix": False},
            }
        )
        server = Server(cfg, store=store, engine=engine)
        daemon.start()
        asyncio.run_coroutine_threadsafe(server.startup(), loop).result(120)
        topic = "edged/bench/request"
        sock_path = cfg.socket.path
        result: dict = {"model": model_name, "threads": engine.describe()["threads"], "requests": requests}

        with SocketClient(sock_path) as c:
            for _ in range(5):  # warm-up
                c.call(SHORT)
            result["socket"] = _overhead([_socket_call(c, SHORT) for _ in range(requests)])
        dev = _MqttRequester(broker.port, topic)
        dev.wait_answered(SHORT)
        for _ in range(5):
            dev.call(SHORT)
        result["mqtt"] = _overhead([dev.call(SHORT) for _ in range(requests)])
        dev.close()
        web = _HttpRequester(http_port)
        for _ in range(5):
            web.call(SHORT)
        result["http"] = _overhead([web.call(SHORT) for _ in range(requests)])
        web.close()

        result["concurrency"] = {"socket": [], "mqtt": [], "http": []}
        for n in clients:
            result["concurrency"]["socket"].append(
                _concurrent(lambda: SocketClient(sock_path), _socket_call, n, per_client)
            )
            result["concurrency"]["mqtt"].append(
                _concurrent(lambda: _MqttRequester(broker.port, topic), lambda cl, p: cl.call(p), n, per_client)
            )
            result["concurrency"]["http"].append(
                _concurrent(lambda: _HttpRequester(http_port), lambda cl, p: cl.call(p), n, per_client)
            )
        result["goals"] = {
            "overhead_p50_le_2ms": all(
                result[t]["overhead_ms_p50"] is not None and result[t]["overhead_ms_p50"] <= 2.0 for t in ("socket", "mqtt", "http")
            ),
            "no_lost_or_duplicated": all(
                r["lost"] == 0 and r["duplicated"] == 0 for rs in result["concurrency"].values() for r in rs
            ),
        }
        return result
    finally:
        if daemon.is_alive():
            asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            daemon.join(10)
        loop.close()
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
