"""The command line as a user meets it: options anywhere on the line, the model's
generation defaults, and `make run`'s script on a machine where no broker runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import REPO, SMOLLM2_HOME, WAIT, edged_cli, free_port, listening, wait_for


def test_options_before_between_and_after_the_positionals(tiny_store):
    home = tiny_store.root.parent
    for argv in (
        ["run", "tiny", "--temperature", "0", "hello", "--num-predict", "3", "-v"],
        ["run", "--num-predict", "3", "-v", "tiny", "--temperature", "0", "hello", "--debug"],
    ):
        r = edged_cli(*argv, home=home)
        assert r.returncode == 0, (argv, r.stderr)
        assert "3 tokens at" in r.stderr, argv  # --num-predict 3 was applied wherever it stood
    r = edged_cli("show", "--json", "tiny", home=home)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "tiny"
    r = edged_cli("run", "tiny", "hello", "one too many", "--temperature", "0", home=home)
    assert r.returncode == 2 and "unrecognized arguments: one too many" in r.stderr


def test_convert_without_generation_settings_shows_none(tiny_store):
    r = edged_cli("show", "tiny", home=tiny_store.root.parent)
    assert r.returncode == 0, r.stderr
    assert "defaults        none (Ollama's option defaults apply)" in r.stdout


@pytest.mark.slow
def test_run_with_options_between_model_and_prompt_answers_berlin(smollm2_store):
    r = edged_cli("run", "smollm2-135m", "--temperature", "0", "What is the capital of Germany?", home=SMOLLM2_HOME)
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout


@pytest.mark.slow
def test_pulled_model_carries_the_registry_generation_settings(smollm2_store):
    from edged.models.registry import EMBEDDED

    want = EMBEDDED["smollm2-135m"].generation
    assert want == {"temperature": 0.2, "top_p": 0.9}
    model = smollm2_store.get("smollm2-135m")
    assert model.manifest["generation_defaults"] == want
    assert json.loads((model.path / "generation.json").read_text()) == want
    r = edged_cli("show", "smollm2-135m", home=SMOLLM2_HOME)
    assert r.returncode == 0, r.stderr
    assert "defaults        temperature 0.2, top_p 0.9" in r.stdout


@pytest.mark.slow
def test_pull_gives_a_store_without_defaults_them_without_converting(smollm2_store, tmp_path):
    """A model prepared before the registry carried settings gets them on the next pull,
    in place of a conversion: same files, same creation time, the new generation.json."""
    from edged.models.registry import set_generation_defaults
    from edged.models.store import ModelStore

    src = smollm2_store.get("smollm2-135m").path
    home = tmp_path / "home"
    # hard links: the copy costs nothing, and nothing below writes into a file in place
    shutil.copytree(src, home / "models" / "smollm2-135m", copy_function=os.link,
                    ignore=shutil.ignore_patterns(".verified.json"))  # fmt: skip
    store = ModelStore(home / "models")
    old = set_generation_defaults(store, store.get("smollm2-135m"), {})
    assert old.manifest["generation_defaults"] == {}
    store.verify(old, mode="full")

    r = edged_cli("pull", "smollm2-135m", home=home, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout and "generation defaults set to temperature 0.2, top_p 0.9" in r.stdout
    assert "quantize" not in r.stderr  # no conversion ran
    new = store.get("smollm2-135m")
    assert new.manifest["generation_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    assert new.manifest["created"] == old.manifest["created"]
    store.verify(new, mode="full")
    assert "up to date" in edged_cli("pull", "smollm2-135m", home=home, timeout=120).stdout
    assert store.get("smollm2-135m").manifest["generation_defaults"] == {"temperature": 0.2, "top_p": 0.9}


class RunScript:
    """scripts/run.sh (what `make run` runs) as a process group, as in a terminal."""

    def __init__(self, env: dict):
        venv = Path(sys.executable).parent.parent
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "run.sh")],
            env={**os.environ, "VENV": str(venv), **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, *endings: str) -> None:
        """Until the daemon has logged a line ending in each of `endings`."""

        def seen() -> bool:
            lines = [line.rstrip() for line in self.lines]
            return all(any(line.endswith(e) for line in lines) for e in endings) or self.proc.poll() is not None

        wait_for(seen, timeout=300, what=f"the daemon to log {endings}")
        assert self.proc.poll() is None, self.text

    def ctrl_c(self) -> int:
        """SIGINT to the whole foreground group, as the terminal sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)
        rc = self.proc.wait(timeout=WAIT)
        self._reader.join(timeout=WAIT)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _run_env(tmp: Path, port: int) -> dict:
    return {
        "EDGED_HOME": str(SMOLLM2_HOME),
        "EDGED_MQTT_HOST": "localhost",
        "EDGED_MQTT_PORT": str(port),
        "EDGED_MQTT_NODE": "runtest",
        "EDGED_SOCKET": str(tmp / "edged.sock"),
        "EDGED_THREADS": "1",
        "MODEL": "smollm2-135m",
    }


@pytest.mark.slow
def test_run_script_starts_a_broker_for_the_session_when_none_listens(smollm2_store, tmp_path):
    port = free_port()
    assert not listening(port)
    run = RunScript(_run_env(tmp_path, port))
    try:
        run.wait_for_log(": ready", "MQTT: connected (session present: False)")
        assert f"nothing listened on the MQTT broker localhost:{port}: started mosquitto" in run.text
        broker_pid = int(run.text.split("started mosquitto (pid ")[1].split(")")[0])
        assert listening(port)

        # both transports answer; `ask` takes the same option flags as `run`, anywhere on the line
        q = "What is the capital of France?"
        by_mqtt = edged_cli("ask", "--mqtt", f"127.0.0.1:{port}", q, "--node", "runtest", "--temperature", "0",
                            "--num-predict", "8", "--json", home=SMOLLM2_HOME, timeout=WAIT)  # fmt: skip
        assert by_mqtt.returncode == 0, by_mqtt.stderr
        final = json.loads(by_mqtt.stdout.strip().splitlines()[-1])
        assert final["done"] and final["eval_count"] <= 8 and "Paris" in final["response"]
        by_socket = edged_cli("ask", q, "--socket", str(tmp_path / "edged.sock"), "--temperature", "0",
                              "--num-predict", "8", home=SMOLLM2_HOME, timeout=WAIT)  # fmt: skip
        assert by_socket.returncode == 0 and "Paris" in by_socket.stdout, by_socket.stderr

        assert run.ctrl_c() == 0, run.text
        assert "stopped the session's mosquitto" in run.text
        assert not os.path.exists(f"/proc/{broker_pid}"), "the session's broker outlived the run"
        assert not listening(port)
    finally:
        run.kill()


@pytest.mark.slow
def test_run_script_uses_the_broker_that_listens(smollm2_store, broker, tmp_path):
    run = RunScript(_run_env(tmp_path, broker.port))
    try:
        run.wait_for_log(": ready", "MQTT: connected (session present: False)")
        assert "started mosquitto" not in run.text
        assert run.ctrl_c() == 0, run.text
        assert broker.proc.poll() is None  # not ours to stop
    finally:
        run.kill()
