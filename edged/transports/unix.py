"""JSON Lines over a Unix stream socket (docs/protocol.md).

Each connection is one requester (a `Peer`) and may send many requests; frames
for them come back interleaved, each tagged with its request `id`. A client that
disconnects cancels what it submitted (the worker stops at the next token). A
client that only half-closes (`socat`, `nc -N` after stdin ends) still gets its
answers.
"""

from __future__ import annotations

import asyncio
import grp
import itertools
import logging
import os
import pwd
import select
import socket
import stat
import struct
import threading
from pathlib import Path

from edged import protocol
from edged.errors import EdgedError, PayloadTooLarge, PermissionDenied
from edged.ops.systemd import listen_fds

log = logging.getLogger("edged.unix")

def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any."""
    fds = listen_fds()
    if not fds:
        return None
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock


class UnixTransport:
    name = "socket"

    def __init__(self, server):
        self.server = server
        self._srv: asyncio.AbstractServer | None = None
        self._conns: set[Connection] = set()
        self._ids = itertools.count(1)
        self.activated = False
        self.path: str | None = None

    @staticmethod
    def enabled(config) -> bool:
        return config.socket.enabled

    @property
    def cfg(self):
        return self.server.config.socket

    def reconfigure(self) -> None:
        pass  # the allowlists are read at each connect

    async def start(self) -> None:
        sock = inherited_socket()
        if sock is not None:
            self.activated = True
            self.path = sock.getsockname() or None
            log.info("listening on inherited socket %s (socket activation)", self.path)
        else:
            sock = self._bind()
        self._srv = await asyncio.start_unix_server(self._client, sock=sock)

    def _bind(self) -> socket.socket:
        path = Path(self.cfg.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise EdgedError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket from a crash: nobody listens on it
                log.info("removed stale socket %s", path)
            else:
                raise EdgedError(f"another daemon is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 ^ self.cfg.mode)  # no window where the socket is wider than asked
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, self.cfg.mode)
        uid = _resolve(self.cfg.owner, pwd.getpwnam, "pw_uid")
        gid = _resolve(self.cfg.group, grp.getgrnam, "gr_gid")
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        sock.listen(512)
        sock.setblocking(False)
        self.path = str(path)
        log.info("listening on %s (mode %o)", path, self.cfg.mode)
        return sock

    async def stop_accepting(self) -> None:
        if self._srv is not None:
            self._srv.close()
        # Our own socket file goes; an activated one belongs to systemd.
        if not self.activated and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def close(self) -> None:
        for c in list(self._conns):
            c.close()
        if self._srv is not None:
            try:
                await asyncio.wait_for(self._srv.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass

    def describe(self) -> dict:
        return {"path": self.path, "activated": self.activated, "connections": len(self._conns)}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer, next(self._ids))
        self._conns.add(conn)
        try:
            await conn.run()
        except Exception:
            log.exception("connection %d failed", conn.n)
        finally:
            self._conns.discard(conn)
            conn.close()


def _resolve(name, lookup, attr) -> int:
    if name is None:
        return -1
    if str(name).isdigit():
        return int(name)
    return getattr(lookup(name), attr)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid


def _peer_groups(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return groups


class Connection(protocol.Peer):
    def __init__(self, transport: UnixTransport, reader, writer, n: int):
        self.t = transport
        self.server = transport.server
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.reader = reader
        self.writer = writer
        self.n = n
        self.scope = f"unix:{n}"
        self.pending = 0  # requests awaiting their final frame
        self.closed = False
        self.idle = asyncio.Event()
        self.idle.set()

    def allowed(self) -> bool:
        cfg = self.t.cfg
        if cfg.allow_uids is None and cfg.allow_gids is None:
            return True
        sock = self.writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        if cfg.allow_uids is not None and uid in cfg.allow_uids:
            return True
        if cfg.allow_gids is not None and _peer_groups(pid, gid) & set(cfg.allow_gids):
            return True
        log.warning("rejected peer pid=%d uid=%d gid=%d (not in the allowlist)", pid, uid, gid)
        return False

    async def run(self) -> None:
        if not self.allowed():
            self._write(protocol.error_frame(None, PermissionDenied("this user is not allowed to use the socket")))
            await self._drain()
            return
        buf = b""
        discarding = False
        while not self.closed:
            try:
                chunk = await self.reader.read(65536)
            except ConnectionError:  # reset by a peer that left with replies unread
                self.closed = True
                break
            if not chunk:
                break
            buf += chunk
            limit = self.server.config.max_request_bytes
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > limit:  # refused while reading: a line never grows past the limit
                        if not discarding:
                            self._write(protocol.error_frame(None, PayloadTooLarge(f"line longer than {limit} bytes")))
                            discarding = True
                        buf = b""
                    break
                line, buf = buf[:nl], buf[nl + 1 :]
                if discarding:
                    discarding = False  # the tail of the oversized line
                    continue
                if line.strip():
                    self.pending += 1
                    self.idle.clear()
                    self.server.receive(line, self)
            await self._drain()
        await self._after_eof()

    async def _after_eof(self) -> None:
        # Half-close (peer still reading) vs. gone: only POLLHUP tells them apart.
        sock = self.writer.get_extra_info("socket")
        p = select.poll()
        if sock.fileno() >= 0:
            p.register(sock.fileno(), select.POLLHUP)
        while self.pending and not self.closed:
            if sock.fileno() < 0 or self.writer.is_closing() or p.poll(0):
                log.info("connection %d closed with %d request(s) pending: cancelling", self.n, self.pending)
                self._cancel_pending()
                self.closed = True
                return
            try:
                await asyncio.wait_for(self.idle.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        await self._drain()

    # -- Peer ----------------------------------------------------------------------
    def send(self, frame: dict, final: bool) -> None:
        if threading.get_ident() == self._loop_thread:
            self._deliver(frame, final)
        else:  # the worker thread
            self.loop.call_soon_threadsafe(self._deliver, frame, final)

    def _deliver(self, frame: dict, final: bool) -> None:
        self._write(frame)
        if final:
            self.pending -= 1
            if self.pending <= 0:
                self.idle.set()

    def _write(self, frame: dict) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(protocol.encode(frame))

    def _cancel_pending(self) -> None:
        if self.pending:
            self.server.cancel_all(self.scope)

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.closed = True
            self._cancel_pending()

    def close(self) -> None:
        self._cancel_pending()
        self.closed = True
        try:
            self.writer.close()
        except Exception:
            pass
