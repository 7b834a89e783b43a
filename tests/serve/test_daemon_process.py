"""`edged serve` as a real process: signals, config errors, socket activation, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml
from helpers import WAIT, DaemonProcess, daemon_config, edged_exe, wait_for

from edged.errors import ConfigError
from edged.serve.client import SocketClient
from edged.serve.config import Config

LONG = {"prompt": "hello", "options": {"num_predict": 120, "temperature": 0}}


@pytest.fixture
def daemon_cfg(tmp_path, tiny_store):
    return daemon_config(tmp_path, tiny_store.root)


def test_sigterm_drains_in_flight_work_and_exits_0(tmp_path, daemon_cfg):
    path = daemon_cfg["socket"]["path"]
    p = DaemonProcess(tmp_path, daemon_cfg).wait_ready(path)
    with SocketClient(path, timeout=WAIT) as c:
        for i in range(3):
            c.send({"id": i, **LONG})
        first = c.read()
        assert "delta" in first or first.get("done")
        p.proc.send_signal(signal.SIGTERM)
        finals = {first["id"]: first} if first.get("done") else {}
        while len(finals) < 3:
            f = c.read()
            if f.get("done"):
                finals[f["id"]] = f
    # within the grace period everything that was accepted finishes
    assert all("response" in f for f in finals.values()), finals
    assert p.proc.wait(WAIT) == 0
    assert not os.path.exists(path)
    assert "stopped" in p.logtext()


def test_sigint_also_stops_cleanly(tmp_path, daemon_cfg):
    p = DaemonProcess(tmp_path, daemon_cfg).wait_ready(daemon_cfg["socket"]["path"])
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(WAIT) == 0


def test_sighup_reloads_live_keys_and_logs_restart_needed(tmp_path, daemon_cfg):
    path = daemon_cfg["socket"]["path"]
    daemon_cfg["queue_size"] = 4
    p = DaemonProcess(tmp_path, daemon_cfg).wait_ready(path)
    daemon_cfg["queue_size"] = 9
    daemon_cfg["keep_alive"] = 42.0
    daemon_cfg["mqtt"]["port"] = 1999
    p.write_config(daemon_cfg)
    p.proc.send_signal(signal.SIGHUP)

    def reloaded():
        with SocketClient(path, timeout=5) as c:
            return c.call({"op": "status"})["status"]["queue_size"] == 9

    wait_for(reloaded, what="queue_size to change")
    wait_for(lambda: "need a restart" in p.logtext(), what="restart warning")
    log = p.logtext()
    assert "mqtt.port" in log and "keep_alive" in log
    with SocketClient(path, timeout=5) as c:
        assert c.call({"op": "status"})["status"]["keep_alive"] == 42.0
    # a broken config on SIGHUP keeps the running one
    p.cfg_path.write_text("queue_size: [oops\n")
    p.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in p.logtext(), what="reload failure logged")
    with SocketClient(path, timeout=5) as c:
        assert c.call({"op": "health"})["health"] == "ok"
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(WAIT) == 0


@pytest.mark.parametrize(
    "text, key",
    [
        ("modle: tiny\n", "modle"),
        ("socket:\n  pth: /tmp/x\n", "socket.pth"),
        ("mqtt:\n  port: eighty\n", "mqtt.port"),
        ("queue_size: 1.5\n", "queue_size"),
        ("mqtt:\n  node: a/b\n", "mqtt.node"),
        ("socket: 5\n", "socket"),
    ],
)
def test_bad_config_is_rejected_naming_key_and_file(tmp_path, text, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = subprocess.run([edged_exe(), "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 1
    assert key in out.stderr and str(cfg) in out.stderr, out.stderr


def test_env_overrides_and_example_file_matches_defaults(tmp_path):
    env = {"EDGED_MODEL": "m2", "EDGED_SOCKET": "/tmp/e.sock", "EDGED_MQTT_PORT": "1884", "EDGED_MQTT_NODE": "007", "EDGED_MQTT": "false"}
    cfg = Config.load(None, env=env)
    assert (cfg.model, cfg.socket.path, cfg.mqtt.port, cfg.mqtt.node, cfg.mqtt.enabled) == ("m2", "/tmp/e.sock", 1884, "007", False)
    with pytest.raises(ConfigError, match="mqtt.port"):
        Config.load(None, env={"EDGED_MQTT_PORT": "high"})
    # every key of the example is a real key, and every real key is in the example
    example = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../examples/edged.yaml")))
    loaded = Config.load(os.path.join(os.path.dirname(__file__), "../../examples/edged.yaml"), env={})
    assert set(_flat(example)) == set(_flat(loaded.to_dict()))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_socket_activation_inherited_fd(tmp_path, daemon_cfg):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    daemon_cfg["socket"]["path"] = str(tmp_path / "unused.sock")
    # systemd passes the socket as fd 3 and names our pid in LISTEN_PID
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])"
    )
    daemon = DaemonProcess(tmp_path, daemon_cfg, argv_prefix=(sys.executable, "-c", launcher, str(fd)), pass_fds=(fd,))
    proc = daemon.proc
    listener.close()
    try:
        with SocketClient(path, timeout=WAIT) as c:  # connecting works before the daemon is ready
            assert "response" in c.call({"id": 1, "prompt": "hi", "options": {"num_predict": 3}})
        assert not os.path.exists(tmp_path / "unused.sock")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert os.path.exists(path)  # an activated socket belongs to systemd: left in place
    finally:
        daemon.kill()


def test_ask_and_status_cli_over_socket(start_daemon):
    d = start_daemon()
    env = {**os.environ, "EDGED_SOCKET": d.socket_path}
    out = subprocess.run([edged_exe(), "ask", "--num-predict", "4", "hi"], capture_output=True, text=True, env=env, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [edged_exe(), "ask", "--socket", d.socket_path, "--json", "--num-predict", "4", "hi"],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    frames = [json.loads(line) for line in out.stdout.splitlines()]
    assert frames[-1]["done"] and frames[-1]["response"] == "".join(f["delta"] for f in frames[:-1])
    out = subprocess.run([edged_exe(), "status", "--json"], capture_output=True, text=True, env=env, timeout=WAIT)
    st = json.loads(out.stdout)
    assert st["model"] == "tiny" and st["requests_completed"] == 2
    out = subprocess.run([edged_exe(), "status", "--socket", "/nonexistent.sock"], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 1 and "is `edged serve` running?" in out.stderr
