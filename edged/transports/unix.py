"""JSON Lines over a Unix stream socket (docs/protocol.md).

Each connection may send many requests; frames for them come back interleaved,
each tagged with its request `id`. A client that disconnects cancels what it
submitted (the worker stops at the next token). A client that only half-closes
(`socat`, `nc -N` after stdin ends) still gets its answers.
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
from pathlib import Path

from edged.errors import EdgedError, PayloadTooLarge, PermissionDenied
from edged.serve import protocol

log = logging.getLogger("edged.unix")

SD_LISTEN_FDS_START = 3


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if n < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
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

    @property
    def cfg(self):
        return self.server.config.socket

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


class Connection:
    def __init__(self, transport: UnixTransport, reader, writer, n: int):
        self.t = transport
        self.server = transport.server
        self.loop = asyncio.get_running_loop()
        self.reader = reader
        self.writer = writer
        self.n = n
        self.scope = f"unix:{n}"
        self.pending = 0  # generations awaiting their final frame
        self.closed = False
        self.eof = False
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
            self.send(protocol.error_frame(None, PermissionDenied("this user is not allowed to use the socket")))
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
            while True:
                nl = buf.find(b"\n")
                limit = self.t.cfg.max_line_bytes
                if nl < 0:
                    if len(buf) > limit:
                        if not discarding:
                            self.send(protocol.error_frame(None, PayloadTooLarge(f"line longer than {limit} bytes")))
                            discarding = True
                        buf = b""
                    break
                line, buf = buf[:nl], buf[nl + 1 :]
                if discarding:
                    discarding = False  # the tail of the oversized line
                    continue
                if len(line) > limit:
                    self.send(protocol.error_frame(None, PayloadTooLarge(f"line longer than {limit} bytes")))
                    continue
                if line.strip():
                    self.on_line(line)
            await self._drain()
        self.eof = True
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
                self.server.scheduler and self.server.scheduler.cancel_scope(self.scope)
                self.closed = True
                return
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        await self._drain()

    def on_line(self, line: bytes) -> None:
        obj = None
        try:
            obj = protocol.decode(line)
            frame = protocol.parse(obj, default_stream=True, max_prompt_chars=self.server.config.max_prompt_chars)
        except EdgedError as e:
            self.send(protocol.error_frame(protocol.peek_id(obj), e))
            return
        if frame.op in protocol.GEN_OPS:
            self.pending += 1
        self.server.handle(frame, self.emit_threadsafe if frame.op in protocol.GEN_OPS else self.emit_here, scope=self.scope)

    def emit_here(self, frame: dict, final: bool) -> None:
        self.send(frame)

    def emit_threadsafe(self, frame: dict, final: bool) -> None:
        # Called from the worker thread (or inline when rejected at submit).
        self.loop.call_soon_threadsafe(self._deliver, frame, final)

    def _deliver(self, frame: dict, final: bool) -> None:
        self.send(frame)
        if final:
            self.pending -= 1
            if self.pending == 0:
                self.idle.set()

    def send(self, frame: dict) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(protocol.encode(frame))

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.closed = True
            if self.pending and self.server.scheduler:
                self.server.scheduler.cancel_scope(self.scope)

    def close(self) -> None:
        log.debug("connection %d closing with %d pending", self.n, self.pending)
        if self.pending and self.server.scheduler:
            self.server.scheduler.cancel_scope(self.scope)
        self.closed = True
        try:
            self.writer.close()
        except Exception:
            pass
