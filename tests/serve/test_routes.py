"""MQTT routes: raw payloads on a topic become prompts; schema-valid JSON goes to another
topic. Real mosquitto; the tiny model for the mechanics, SmolLM2 for the shipped recipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import jsonschema
import yaml
from helpers import REPO, WAIT, DaemonProcess, Device, Gate, daemon_config, wait_for

SCHEMA = {
    "type": "object",
    "properties": {"alert": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 40}},
    "required": ["alert", "reason"],
}
REPLY_TOPICS = ["+/+/reply", "alerts/+/temperature"]


def _route(**over) -> dict:
    return {
        "name": "temp",
        "topic": "sensors/+/temperature",
        "system": "You watch room temperatures.",
        "prompt": "Room {{ levels[1] }}: {{ text }} C",
        "options": {"num_predict": 120, "temperature": 0},
        "format": SCHEMA,
        "publish": "alerts/{1}/temperature",
        **over,
    }


def _outputs(dev: Device, prefix: str = "alerts/") -> list[tuple[str, bytes]]:
    with dev.cond:
        return [(t, p) for t, p in dev.raw if t.startswith(prefix)]


def test_route_publishes_schema_valid_json_on_the_topic_built_from_levels(start_daemon, broker):
    d = start_daemon(broker=broker, routes=[_route()], mqtt__reply_topics=REPLY_TOPICS)
    dev = Device(broker).connect("alerts/#")
    wait_for(lambda: d.server.transports[-1].connected.is_set(), what="MQTT connection")
    time.sleep(0.3)  # the route subscription follows the connection
    dev.c.publish("sensors/kitchen/temperature", "34.5", qos=1)
    dev.c.publish("sensors/garage/temperature", "not even a number", qos=1)
    wait_for(lambda: len(_outputs(dev)) == 2, what="two route outputs")
    topics = sorted(t for t, _ in _outputs(dev))
    assert topics == ["alerts/garage/temperature", "alerts/kitchen/temperature"]
    for _, payload in _outputs(dev):
        jsonschema.validate(json.loads(payload), SCHEMA)
    routes = d.call({"op": "status"})["status"]["transports"]["mqtt"]["routes"]
    assert routes[0]["name"] == "temp" and routes[0]["answered"] == 2 and routes[0]["received"] == 2


def test_a_chatty_sensor_is_coalesced_newest_wins(start_daemon, broker):
    d = start_daemon(broker=broker, routes=[_route()], mqtt__reply_topics=REPLY_TOPICS)
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    dev = Device(broker).connect("alerts/#")
    wait_for(lambda: d.server.transports[-1].connected.is_set(), what="MQTT connection")
    time.sleep(0.3)
    dev.c.publish("sensors/kitchen/temperature", "20.0", qos=1)
    assert gate.reached.wait(WAIT)  # the first reading is running and held
    for i in range(30):
        dev.c.publish("sensors/kitchen/temperature", f"{21 + i}.0", qos=1)
    wait_for(lambda: d.call({"op": "status"})["status"]["transports"]["mqtt"]["routes"][0]["received"] == 31,
             what="all readings received")
    gate.release.set()
    wait_for(lambda: len(_outputs(dev)) == 2, what="the running and the newest reading answered")
    time.sleep(0.5)
    assert len(_outputs(dev)) == 2  # not 31 prompts
    route = d.call({"op": "status"})["status"]["transports"]["mqtt"]["routes"][0]
    assert route["dropped"] == 29 and route["answered"] == 2


def test_output_topic_outside_the_reply_policy_is_refused_on_the_error_topic(start_daemon, broker):
    d = start_daemon(broker=broker, routes=[_route(publish="home/{1}/heater/set")])
    dev = Device(broker).connect("edged/testnode/error", "home/#")
    wait_for(lambda: d.server.transports[-1].connected.is_set(), what="MQTT connection")
    time.sleep(0.3)
    dev.c.publish("sensors/kitchen/temperature", "34.5", qos=1)
    wait_for(lambda: any(t == "edged/testnode/error" for t, _ in dev.messages), what="the error")
    err = next(m for t, m in dev.messages if t == "edged/testnode/error")
    assert err["error"]["code"] == "reply_topic_refused" and err["route"] == "temp"
    assert not [t for t, _ in dev.raw if t.startswith("home/")]


def test_routes_reload_on_sighup(tmp_path, tiny_store, broker):
    cfg = daemon_config(tmp_path, tiny_store.root, broker=broker, mqtt__reply_topics=REPLY_TOPICS + ["alerts/+/humidity"],
                        routes=[_route()])
    with DaemonProcess(tmp_path, cfg) as d:
        d.wait_ready()
        wait_for(lambda: "MQTT: connected" in d.logtext(), what="MQTT connection")
        dev = Device(broker).connect("alerts/#")
        cfg["routes"] = [_route(name="hum", topic="sensors/+/humidity", publish="alerts/{1}/humidity")]
        d.write_config(cfg)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.logtext(), what="the reload")
        time.sleep(0.5)
        dev.c.publish("sensors/kitchen/temperature", "34.5", qos=1)  # no longer routed
        dev.c.publish("sensors/kitchen/humidity", "80", qos=1)
        wait_for(lambda: _outputs(dev), what="the new route's output")
        time.sleep(0.5)
        assert [t for t, _ in _outputs(dev)] == ["alerts/kitchen/humidity"]
        dev.close()


def test_the_shipped_recipe_with_mosquitto_pub_and_sub(tmp_path, smollm2_store, broker):
    """examples/routes/edged.yaml, exactly, with SmolLM2: a reading published with
    mosquitto_pub comes out on alerts/<room>/temperature as JSON that validates."""
    recipe = yaml.safe_load((REPO / "examples/routes/edged.yaml").read_text())
    route = recipe["routes"][0]
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(smollm2_store.root, home / "models")
    env = {"EDGED_HOME": str(home), "EDGED_MQTT_HOST": "127.0.0.1", "EDGED_MQTT_PORT": str(broker.port),
           "EDGED_MQTT_NODE": "recipe", "EDGED_SOCKET": str(tmp_path / "s" / "edged.sock")}
    (tmp_path / "s").mkdir(mode=0o700)
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([shutil.which("edged") or str(REPO / ".venv/bin/edged"), "serve", "--config",
                             str(REPO / "examples/routes/edged.yaml")], env={**os.environ, **env}, stdout=log,
                            stderr=subprocess.STDOUT)
    sub = None
    try:
        wait_for(lambda: "MQTT: connected" in (tmp_path / "daemon.log").read_text(), what="the daemon")
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "alerts/#", "-v",
                                "-C", "1", "-W", str(int(WAIT))], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
                        "sensors/kitchen/temperature", "-m", "34.5"], check=True)
        out, _ = sub.communicate(timeout=WAIT)
        topic, _, payload = out.strip().partition(" ")
        print(f"\n$ mosquitto_pub -t sensors/kitchen/temperature -m 34.5\n$ mosquitto_sub -t 'alerts/#' -v\n{out.strip()}")
        assert topic == "alerts/kitchen/temperature"
        jsonschema.validate(json.loads(payload), route["format"])
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
        log.close()
