"""The Unix socket against hostile or broken local clients: connection caps (in total
and per uid), partial-line and idle timeouts, bounded memory under a flood, group
allowlists that see supplementary groups, a socket directory nobody else controls,
and a live socket that is never deleted. Real daemons (threads and processes), real
client processes running as other users and groups (the tests run as root)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import WAIT, DaemonProcess, Gate, daemon_config, wait_for

from edged.errors import EdgedError
from edged.serve.client import SocketClient

GEN = {"prompt": "hello there", "options": {"num_predict": 8, "temperature": 0}}
NOBODY = 65534
MB = 1024 * 1024

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as other users and groups (needs root)")

# One request on a fresh connection from a separate process (so it can run as another
# user or with other groups); prints the first frame it gets back.
CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"id": "c", "op": "health"}\n')
except (BrokenPipeError, ConnectionResetError):
    pass  # refused: the daemon's one frame is still there to read
print(s.makefile("rb").readline().decode().strip())
"""


# stdlib-only client scripts run on the system's Python: the venv may not be readable by other users
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run_client(path: str, **popen) -> dict:
    out = subprocess.run([PYTHON, "-c", CLIENT, path], capture_output=True, text=True, timeout=WAIT, **popen)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def shared_runtime_dir(monkeypatch):
    """A runtime directory (what systemd's RuntimeDirectory= gives the daemon) that other
    users can reach, so clients running as `nobody` can connect to a socket in it."""
    d = Path(tempfile.mkdtemp(prefix="edged-rt-", dir="/tmp"))
    d.chmod(0o755)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# Opens N connections as one user, sorts out which the daemon refused (they get one frame
# and are closed; admitted ones hear nothing), then on the admitted ones: every third stays
# idle, every third holds an unfinished line just under the request limit, every third
# sends 1 MiB without a newline. Prints a summary and holds everything until stdin closes.
FLOODER = r"""
import json, select, socket, sys, time
path, n, expect_refused, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    conns.append(s)
by_fd = {s.fileno(): i for i, s in enumerate(conns)}
p = select.poll()
for s in conns:
    p.register(s, select.POLLIN)
codes = {}
end = time.monotonic() + 60
while time.monotonic() < end and len(codes) < expect_refused:
    for fd, _ in p.poll(200):
        i = by_fd[fd]
        data = conns[i].recv(65536)
        p.unregister(fd)
        codes[i] = json.loads(data.split(b"\n")[0])["error"]["code"] if data else "eof"
for fd, _ in p.poll(500):  # any refusal beyond the expected count
    i = by_fd[fd]
    codes[i] = json.loads(conns[i].recv(65536).split(b"\n")[0] or b'{"error":{"code":"eof"}}')["error"]["code"]
admitted = [s for i, s in enumerate(conns) if i not in codes]
half = b'{"prompt": "' + b"a" * (limit - 64)
big = b"b" * (1 << 20)
kinds = {"idle": 0, "half_line": 0, "big_line": 0}
for i, s in enumerate(admitted):
    if i % 3 == 1:
        s.sendall(half)
        kinds["half_line"] += 1
    elif i % 3 == 2:
        s.sendall(big)
        kinds["big_line"] += 1
    else:
        kinds["idle"] += 1
print(json.dumps({"admitted": len(admitted), "refused": sorted(codes.values()), "kinds": kinds,
                  "half_bytes": len(half)}), flush=True)
sys.stdin.read()
"""


def test_flood_of_idle_and_half_line_connections_keeps_the_daemon_answering(tmp_path, tiny_store, shared_runtime_dir):
    """300 connections from one local user, with the default caps and request limit: the
    daemon holds 128 (the per-uid cap), refuses the rest with one clear frame, keeps
    answering another user, and its RSS grows by no more than what the limits allow."""
    path = str(shared_runtime_dir / "edged" / "edged.sock")
    cfg = daemon_config(tmp_path, tiny_store.root, socket={"path": path, "mode": 0o666, "idle_timeout": 600.0,
                                                           "line_timeout": 600.0})
    limit, per_uid = 256 * 1024, 128  # the defaults (config.max_request_bytes, socket.max_connections_per_uid)
    n = 300
    with DaemonProcess(tmp_path, cfg, env={"RUNTIME_DIRECTORY": str(shared_runtime_dir)}) as d:
        d.wait_ready(path)
        with SocketClient(path, timeout=WAIT) as c:
            assert "response" in c.call({"id": "warm", **GEN})
            st = c.call({"op": "status"})["status"]
        assert st["transports"]["socket"]["max_connections"] == 256
        before = rss_bytes(d.proc.pid)

        flood = subprocess.Popen([PYTHON, "-c", FLOODER, path, str(n), str(n - per_uid), str(limit)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 user=NOBODY, group=NOBODY, extra_groups=[])
        try:
            summary = json.loads(flood.stdout.readline() or "null")
            assert summary is not None, "the flooder failed"
            assert summary["admitted"] == per_uid
            assert summary["refused"] == ["too_many_connections"] * (n - per_uid)

            # another user (root here) is still served while the flood is held open
            with SocketClient(path, timeout=WAIT) as c:
                assert "response" in c.call({"id": "good", **GEN})
                conns = c.call({"op": "status"})["status"]["transports"]["socket"]["connections"]
                assert conns == per_uid + 1
                assert c.call({"op": "health"})["health"] == "ok"
            after = 0
            for _ in range(5):  # the largest of a few samples over a second
                after = max(after, rss_bytes(d.proc.pid))
                time.sleep(0.2)
            assert flood.poll() is None  # the flood was held for the whole measurement
        finally:
            flood.stdin.close()
            flood.wait(WAIT)
        growth = after - before
        kinds = summary["kinds"]
        print(f"\nsocket flood: {n} connections from uid {NOBODY}: {summary['admitted']} held "
              f"({kinds['idle']} idle, {kinds['half_line']} unfinished lines of {summary['half_bytes']} B, "
              f"{kinds['big_line']} 1 MiB lines without newline), {len(summary['refused'])} refused; "
              f"daemon RSS {before / MB:.1f} -> {after / MB:.1f} MB, growth {growth / MB:.1f} MB")
        # each connection buffers at most max_request_bytes: 43 * 256 KiB is ~11 MB
        assert growth < 40 * MB


def test_connection_caps_per_uid_and_in_total(start_daemon, tmp_path, shared_runtime_dir):
    path = str(shared_runtime_dir / "edged" / "edged.sock")
    d = start_daemon(socket={"path": path, "mode": 0o666, "max_connections": 10, "max_connections_per_uid": 3})
    held = [d.client() for _ in range(3)]
    for c in held:
        assert c.call({"op": "health"})["health"] == "ok"
    with d.client() as over:
        f = over.read()
        assert f["error"]["code"] == "too_many_connections", f
        assert "this user" in f["error"]["message"] and f["error"]["retry_after_ms"] > 0
        assert over.file.readline() == b""  # and closed
    # the cap is per uid: another user still gets in
    assert run_client(path, user=NOBODY, group=NOBODY, extra_groups=[])["health"] == "ok"
    # a connection that goes frees its slot
    held.pop().close()
    wait_for(lambda: held[0].call({"op": "status"})["status"]["transports"]["socket"]["connections"] == 2,
             what="the closed connection to be counted out")
    with d.client() as c:
        assert "response" in c.call(GEN)
    for c in held:
        c.close()

    total = start_daemon(socket={"path": str(tmp_path / "t" / "edged.sock"), "max_connections": 2,
                                 "max_connections_per_uid": 10})
    held = [total.client() for _ in range(2)]
    for c in held:
        assert c.call({"op": "health"})["health"] == "ok"
    with total.client() as over:
        f = over.read()
        assert f["error"]["code"] == "too_many_connections" and "the daemon has 2 connections" in f["error"]["message"]
        assert over.file.readline() == b""
    for c in held:
        c.close()


def test_partial_line_and_idle_timeouts_spare_a_client_waiting_for_its_answer(start_daemon):
    d = start_daemon(max_request_bytes=64 * 1024, socket={"line_timeout": 0.5, "idle_timeout": 1.0})
    gate = Gate(at=1)
    d.server.scheduler.token_hooks.append(gate)
    waiting = d.client()
    waiting.send({"id": "w", **GEN})
    assert gate.reached.wait(WAIT)  # its answer is held back by the worker

    half = d.client()
    half.sock.sendall(b'{"id": "h", "prompt": "unfinis')  # and then nothing
    endless = d.client()
    endless.sock.sendall(b"x" * (200 * 1024))  # past the limit, no newline, then nothing
    idle = d.client()

    f = half.read()
    assert f["error"]["code"] == "line_timeout", f
    assert half.file.readline() == b""
    assert endless.read()["error"]["code"] == "payload_too_large"
    assert endless.read()["error"]["code"] == "line_timeout"
    assert endless.file.readline() == b""
    f = idle.read()
    assert f["error"]["code"] == "idle_timeout", f
    assert idle.file.readline() == b""

    # `waiting` went silent before `idle` connected, so it has been silent longer than the
    # idle timeout: it is still open because it has a request in progress.
    gate.release.set()
    frames = []
    while not frames or not frames[-1].get("done"):
        frames.append(waiting.read())
    assert all(f["id"] == "w" for f in frames) and "response" in frames[-1]
    for c in (waiting, half, endless, idle):
        c.close()
    assert d.call({"op": "health"})["health"] == "ok"


def test_allow_gids_matches_a_supplementary_group(start_daemon):
    d = start_daemon(socket={"allow_gids": [4242]})
    # root (uid 0, gid 0) with 4242 only as a supplementary group, as `usermod -aG` gives it
    assert run_client(d.socket_path, extra_groups=[4242])["health"] == "ok"
    assert run_client(d.socket_path, extra_groups=[])["error"]["code"] == "permission_denied"
    assert run_client(d.socket_path, extra_groups=[17, 4242, 99])["health"] == "ok"


def test_socket_directory_outside_a_runtime_dir_must_be_the_daemons_and_0700(start_daemon, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    d = Path(tempfile.mkdtemp(prefix="edged-", dir="/tmp"))  # like the /tmp/edged-<uid> fallback
    path = d / "edged.sock"
    try:
        os.chown(d, NOBODY, NOBODY)  # another user created it first
        with pytest.raises(EdgedError, match=re.escape(f"{d} is owned by uid {NOBODY}")):
            start_daemon(socket={"path": str(path)})
        assert not path.exists()

        os.chown(d, 0, 0)
        d.chmod(0o755)
        with pytest.raises(EdgedError, match="must be 0700"):
            start_daemon(socket={"path": str(path)})
        assert not path.exists()

        d.chmod(0o700)
        assert start_daemon(socket={"path": str(path)}).call({"op": "health"})["health"] == "ok"

        sub = d / "made" / "here"  # a missing directory is created 0700
        assert start_daemon(socket={"path": str(sub / "edged.sock")}).call({"op": "health"})["health"] == "ok"
        assert stat.S_IMODE(os.stat(sub).st_mode) == 0o700
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_live_socket_whose_probe_fails_for_another_reason_is_left_alone(start_daemon, tmp_path):
    path = Path(daemon_config(tmp_path)["socket"]["path"])
    path.parent.mkdir(parents=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    for _ in range(64):  # fill its backlog: a new connect now fails with EAGAIN, not ECONNREFUSED
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            break
        queued.append(c)
    inode = os.stat(path).st_ino
    with pytest.raises(EdgedError, match=re.escape(str(path))) as err:
        start_daemon()
    assert "refusing to start" in err.value.message
    assert os.stat(path).st_ino == inode  # not deleted, not replaced
    conn, _ = listener.accept()  # and still the other program's live socket
    conn.close()
    for c in queued:
        c.close()
    listener.close()


def test_descriptor_limit_is_raised_to_fit_the_cap_or_the_start_is_refused(tmp_path, tiny_store):
    cfg = daemon_config(tmp_path, tiny_store.root, socket={"max_connections": 300})
    path = cfg["socket"]["path"]
    # soft limit 100, hard 4096: the daemon raises its soft limit to fit 300 connections
    with DaemonProcess(tmp_path, cfg, argv_prefix=("prlimit", "--nofile=100:4096", "--")) as d:
        d.wait_ready(path)
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        soft = int(re.search(r"Max open files\s+(\d+)", limits).group(1))
        assert 300 < soft <= 4096
        assert d.stop() == 0
    # hard limit 200: no way to fit 300 connections; refused with a message naming both
    with DaemonProcess(tmp_path, cfg, argv_prefix=("prlimit", "--nofile=100:200", "--")) as d:
        assert d.proc.wait(WAIT) != 0
        log = d.logtext()
        assert "socket.max_connections 300" in log and "LimitNOFILE" in log, log[-2000:]
