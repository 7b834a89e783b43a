"""A real daemon inside a memory-limited cgroup (v2 when delegated, else v1 on hybrid hosts):
the governor reads the limit, refuses a request whose KV cache would not fit and refuses to
reload a model that would not fit, and the daemon is never OOM-killed."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
from helpers import WAIT, DaemonProcess, NotifyListener, daemon_config, unix_path

from edged.serve.client import SocketClient

MB = 1 << 20


def _make_cgroup() -> tuple[Path, str]:
    """A fresh memory cgroup we may write, or skip."""
    name = f"edged-test-{uuid.uuid4().hex[:8]}"
    for base, kind in ((Path("/sys/fs/cgroup"), "v2"), (Path("/sys/fs/cgroup/memory"), "v1")):
        ctl = base / ("cgroup.subtree_control" if kind == "v2" else "memory.limit_in_bytes")
        if not ctl.exists() or (kind == "v2" and "memory" not in ctl.read_text()):
            continue
        try:
            (base / name).mkdir()
            return base / name, kind
        except OSError:
            continue
    pytest.skip("no writable memory cgroup on this machine")


def _limit(cg: Path, kind: str, nbytes: int) -> None:
    (cg / ("memory.max" if kind == "v2" else "memory.limit_in_bytes")).write_text(str(nbytes))


def _usage(cg: Path, kind: str) -> int:
    return int((cg / ("memory.current" if kind == "v2" else "memory.usage_in_bytes")).read_text())


def test_daemon_in_a_memory_limited_cgroup(tmp_path, smollm2_store):
    cg, kind = _make_cgroup()
    notify = NotifyListener(unix_path(tmp_path, "notify.sock"))
    daemon = None
    try:
        _limit(cg, kind, 600 * MB)
        cfg = daemon_config(tmp_path, smollm2_store.root, model="smollm2-135m", keep_alive=0,
                            governor={"reserve_mb": 32, "tight_mb": 48, "critical_mb": 8},
                            limits={"max_num_predict": 8192})  # the request below must ask for a cache that cannot fit
        # enter the cgroup first, then exec the daemon: everything it allocates is charged there
        daemon = DaemonProcess(tmp_path, cfg, env={"NOTIFY_SOCKET": notify.path},
                               argv_prefix=("sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"))
        proc = daemon.proc
        notify.wait(lambda m: m.get("READY") == "1", what="READY=1")
        path = cfg["socket"]["path"]
        with SocketClient(path, timeout=WAIT) as c:
            gov = c.call({"op": "status"})["status"]["governor"]
            assert gov["cgroup"]["max"] == 600 * MB and gov["headroom_bytes"] < 600 * MB
            ok = c.call({"id": 1, "prompt": "The capital of France is", "options": {"num_predict": 8, "temperature": 0}})
            assert ok.get("done") and ok.get("response"), ok
            # a KV cache of 8192 tokens (~360 MiB for SmolLM2) does not fit: refused before it runs
            big = c.call({"id": 2, "prompt": "Tell me everything.", "options": {"num_ctx": 8192, "num_predict": 8000}})
            assert "error" in big and big["error"]["code"] == "insufficient_memory", (big, gov)
            assert "KV cache needs" in big["error"]["message"]
        # keep_alive 0: the model was unloaded after request 1. Squeeze the limit so it cannot reload.
        used = _usage(cg, kind)
        _limit(cg, kind, used + 120 * MB)
        with SocketClient(path, timeout=WAIT) as c:
            c.call({"op": "status"})  # let the governor see the new limit (interval 2 s is not awaited)
            refused = None
            for _ in range(50):
                r = c.call({"id": "r", "prompt": "hi", "options": {"num_predict": 2}})
                if r.get("error", {}).get("code") == "insufficient_memory":
                    refused = r
                    break
            # refused at admission (reload + KV cache > headroom) or by the loader's own check
            msg = refused["error"]["message"] if refused else r
            assert "cannot load the model" in msg or "to reload the model" in msg, msg
        assert proc.poll() is None  # alive: nothing was OOM-killed
        if kind == "v1":
            oom = (cg / "memory.oom_control").read_text()
            assert "oom_kill 0" in oom
        else:
            assert "oom_kill 0" in (cg / "memory.events").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if daemon is not None:
            daemon.kill()
        notify.close()
        try:
            cg.rmdir()
        except OSError:
            pass
