"""JSON Lines over a Unix stream socket (docs/protocol.md).

Each connection is one requester (a `Peer`) and may send many requests; frames
for them come back interleaved, each tagged with its request `id`. A client that
disconnects cancels what it submitted (the worker stops at the next token). A
client that only half-closes (`socat`, `nc -N` after stdin ends) still gets its
answers.

Limits, all enforced while reading:
- a connection never buffers more than `max_request_bytes` of an unfinished
  line (the rest of an oversized line is read and dropped);
- connections are capped in total and per peer uid; over a cap the client gets
  one `too_many_connections` frame and is closed;
- a line must reach its newline within `line_timeout`, and a connection with no
  request in progress is closed after `idle_timeout` (one error frame each). A
  connection waiting for its answers is never idle;
- a client that does not read its answers is not read from either, so replies
  cannot pile up in memory.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import itertools
import logging
import os
import pwd
import resource
import select
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from edged import protocol
from edged.errors import (
    EdgedError,
    IdleTimeout,
    LineTimeout,
    PayloadTooLarge,
    PermissionDenied,
    TooManyConnections,
)
from edged.ops.systemd import listen_fds
from edged.transports import Transport

log = logging.getLogger("edged.unix")

RECV_SIZE = 64 * 1024  # largest single read
CLOSE_GRACE = 2.0  # seconds a closing connection may take to read its last frame before it is aborted
FD_HEADROOM = 64  # descriptors kept free beyond the connection cap (model reload, MQTT reconnect, logs)
# Linux >= 4.13; the same value on x86, arm and arm64. Python 3.11 does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any."""
    fds = listen_fds()
    if not fds:
        return None
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock


def bind_socket(path: Path, sc, *, what: str) -> socket.socket:
    """A non-blocking AF_UNIX socket bound at `path` with the socket section's mode, owner
    and group (`sc`), in a directory nobody else controls; a live socket there is never
    replaced, a stale one (ECONNREFUSED) is."""
    _prepare_directory(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise EdgedError(f"{path} exists and is not a socket; refusing to replace it")
        _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 ^ sc.mode)  # no window where the socket is wider than asked
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise EdgedError(f"cannot create {what} {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, sc.mode)
    uid = _resolve(sc.owner, pwd.getpwnam, "pw_uid")
    gid = _resolve(sc.group, grp.getgrnam, "gr_gid")
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid)
    sock.setblocking(False)
    return sock


class UnixTransport(Transport):
    name = "socket"

    def __init__(self, server):
        super().__init__(server)
        self._srv: asyncio.AbstractServer | None = None
        self._conns: set[Connection] = set()  # admitted and not yet lost
        self._per_uid: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._max_total = 0  # the total cap in force (config, checked against the descriptor limit)
        self._sweeper: asyncio.Task | None = None
        self._refused = 0  # connections refused since the last summary in the log
        self._refused_since = 0.0
        # The one receive buffer: the event loop reads one connection at a time and
        # copies what belongs to an unfinished line into that connection's own buffer.
        self.scratch = bytearray(RECV_SIZE)
        self.activated = False
        self.path: str | None = None

    def reconfigure(self) -> None:
        # Allowlists, per-uid cap and timeouts are read where they are used; the total
        # cap needs descriptors to back it.
        want = self.cfg.max_connections
        if want != self._max_total:
            try:
                _reserve_descriptors(want)
            except EdgedError as e:
                log.error("keeping socket.max_connections at %d: %s", self._max_total, e.message)
                return
            self._max_total = want

    async def start(self) -> None:
        _reserve_descriptors(self.cfg.max_connections)
        self._max_total = self.cfg.max_connections
        sock = inherited_socket()
        if sock is not None:
            self.activated = True
            self.path = sock.getsockname() or None
            log.info("listening on inherited socket %s (socket activation)", self.path)
        else:
            sock = self._bind()
        loop = asyncio.get_running_loop()
        self._srv = await loop.create_unix_server(self._new_connection, sock=sock, backlog=512)
        self._sweeper = asyncio.create_task(self._sweep())

    def _bind(self) -> socket.socket:
        sock = bind_socket(Path(self.cfg.path), self.cfg, what="the socket")
        sock.listen(512)
        self.path = str(self.cfg.path)
        log.info("listening on %s (mode %o)", self.path, self.cfg.mode)
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
        if self._sweeper is not None:
            self._sweeper.cancel()
        for c in list(self._conns):
            c.close()
        if self._srv is not None:
            try:
                await asyncio.wait_for(self._srv.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass

    def describe(self) -> dict:
        return {"path": self.path, "activated": self.activated, "connections": len(self._conns),
                "max_connections": self._max_total}

    # -- connections ---------------------------------------------------------------
    def _new_connection(self) -> "Connection":
        return Connection(self, next(self._ids))

    def admit(self, conn: "Connection", pid: int, uid: int, gid: int) -> EdgedError | None:
        """Count a new connection in, or say why it is refused."""
        cfg = self.cfg
        if not self._allowed(conn, pid, uid, gid):
            return PermissionDenied("this user is not allowed to use the socket")
        retry = self.server.config.retry_after_ms
        if len(self._conns) >= self._max_total:
            self._note_refusal(f"connection cap reached ({self._max_total} in total, socket.max_connections)")
            return TooManyConnections(f"the daemon has {self._max_total} connections open, its limit; retry later",
                                      retry_after_ms=retry)
        per_uid = cfg.max_connections_per_uid
        if self._per_uid.get(uid, 0) >= per_uid:
            self._note_refusal(f"uid {uid} reached its connection cap ({per_uid}, socket.max_connections_per_uid)")
            return TooManyConnections(f"this user has {per_uid} connections open, its limit; retry later",
                                      retry_after_ms=retry)
        self._conns.add(conn)
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        return None

    def forget(self, conn: "Connection") -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            left = self._per_uid.get(conn.uid, 1) - 1
            if left > 0:
                self._per_uid[conn.uid] = left
            else:
                self._per_uid.pop(conn.uid, None)

    def _allowed(self, conn: "Connection", pid: int, uid: int, gid: int) -> bool:
        cfg = self.cfg
        if cfg.allow_uids is None and cfg.allow_gids is None:
            return True
        if cfg.allow_uids is not None and uid in cfg.allow_uids:
            return True
        if cfg.allow_gids is not None and peer_groups(conn.sock, uid, gid) & set(cfg.allow_gids):
            return True
        self._note_refusal(f"peer pid={pid} uid={uid} gid={gid} is not in the allowlist")
        return False

    def _note_refusal(self, why: str) -> None:
        # The first refusal is logged with its reason; a flood is summarised by the sweep.
        if self._refused == 0:
            log.warning("refused a connection: %s", why)
            self._refused_since = time.monotonic()
        self._refused += 1

    async def _sweep(self) -> None:
        """Close connections past their idle or line timeout (both live settings)."""
        while True:
            cfg = self.cfg
            timeouts = [t for t in (cfg.idle_timeout, cfg.line_timeout) if t > 0]
            await asyncio.sleep(min(1.0, max(0.05, min(timeouts) / 4)) if timeouts else 1.0)
            now = time.monotonic()
            for c in list(self._conns):
                c.check_timeouts(now)
            if self._refused > 1 and now - self._refused_since >= 60:
                log.warning("refused %d connections in the last %.0f s", self._refused, now - self._refused_since)
                self._refused, self._refused_since = 0, now
            elif self._refused == 1 and now - self._refused_since >= 60:
                self._refused = 0


def _resolve(name, lookup, attr) -> int:
    if name is None:
        return -1
    if str(name).isdigit():
        return int(name)
    return getattr(lookup(name), attr)


# -- start-up checks ---------------------------------------------------------------


def _runtime_roots() -> list[Path]:
    roots = ["/run"]
    roots += [p for p in os.environ.get("RUNTIME_DIRECTORY", "").split(":") if p]  # systemd RuntimeDirectory=
    if os.environ.get("XDG_RUNTIME_DIR"):
        roots.append(os.environ["XDG_RUNTIME_DIR"])
    return [Path(os.path.realpath(r)) for r in roots]


def _under_runtime_dir(directory: Path) -> bool:
    real = Path(os.path.realpath(directory))
    return any(real == r or real.is_relative_to(r) for r in _runtime_roots())


def _prepare_directory(directory: Path) -> None:
    """Create the socket's directory, or check one that exists: nobody but the daemon's
    user (or root, in a runtime directory) may be able to replace the socket in it.

    Outside a runtime directory (e.g. the /tmp fallback, where another user could
    have created the directory first) it must be owned by the daemon's user and
    mode 0700. A failed check stops the start with a message naming the directory."""
    runtime = _under_runtime_dir(directory)
    euid = os.geteuid()
    if not os.path.lexists(directory):
        try:
            # 0755 in a runtime directory so socket.mode/group decide who connects
            os.makedirs(directory, mode=0o755 if runtime else 0o700)
        except OSError as e:
            raise EdgedError(f"cannot create the socket directory {directory}: {e.strerror}") from None
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) and not runtime:
        raise EdgedError(f"socket directory {directory} is a symlink; refusing to use it "
                         "(outside a runtime directory it must be a real directory owned by the daemon's user)")
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise EdgedError(f"socket directory {directory} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if runtime:
        if st.st_uid not in (euid, 0):
            raise EdgedError(f"socket directory {directory} is owned by uid {st.st_uid}, not by the daemon's user "
                             f"(uid {euid}) or root; refusing to start")
        if mode & 0o002:
            raise EdgedError(f"socket directory {directory} is writable by every user (mode {mode:04o}); "
                             "refusing to start: another user could replace the socket")
        return
    if st.st_uid != euid:
        raise EdgedError(f"socket directory {directory} is owned by uid {st.st_uid}, not by the daemon's user "
                         f"(uid {euid}); refusing to start: another user may have created it to take over the "
                         "socket. Remove it, or set socket.path under /run or $XDG_RUNTIME_DIR")
    if mode & 0o077:
        raise EdgedError(f"socket directory {directory} has mode {mode:04o}; outside a runtime directory "
                         f"(/run, $XDG_RUNTIME_DIR) it must be 0700. `chmod 700 {directory}`, or set "
                         "socket.path under /run or $XDG_RUNTIME_DIR")


def _remove_if_stale(path: Path) -> None:
    """Remove a socket file nobody listens on. Only ECONNREFUSED proves that; any
    other outcome (a live daemon, a full backlog, no permission) stops the start."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # stale socket from a crash
        log.info("removed stale socket %s", path)
        return
    except OSError as e:
        why = e.strerror or (errno.errorcode.get(e.errno) if e.errno else None) or type(e).__name__
        raise EdgedError(f"cannot tell whether {path} is in use ({why}); refusing to start and leaving it in "
                         "place. If no daemon uses it, remove it") from None
    finally:
        probe.close()
    raise EdgedError(f"another daemon is already listening on {path}")


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def _reserve_descriptors(connections: int) -> None:
    """Make sure the descriptor limit fits the connection cap with room to spare (raising
    the soft limit up to the hard one if needed), so a flood of connections never leaves
    the daemon unable to reload its model or reconnect to MQTT."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = _open_descriptors() + connections + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise EdgedError(f"socket.max_connections {connections} needs about {need} file descriptors but the limit "
                         f"is {hard}; lower socket.max_connections or raise LimitNOFILE= (ulimit -n)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    log.info("raised the file descriptor limit from %d to %d for socket.max_connections %d", soft, need, connections)


# -- peer credentials --------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid


def peer_groups(sock: socket.socket, uid: int, gid: int) -> set[int]:
    """The peer's primary and supplementary groups as they were at connect().

    SO_PEERGROUPS (Linux >= 4.13) gives the connecting process's own groups and
    needs no /proc access (the unit's ProtectProc=invisible hides other processes).
    Without it, or with more than 256 groups, the user's groups from the group
    database (os.getgrouplist) stand in."""
    groups = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # CPython's largest buffer: 256 groups
    except OSError:  # ENOPROTOOPT (older kernel), ERANGE (more groups than fit)
        pass
    else:
        groups.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        return groups
    try:
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        pass
    return groups


# -- one connection ----------------------------------------------------------------


class Connection(asyncio.BufferedProtocol, protocol.Peer):
    def __init__(self, transport: UnixTransport, n: int):
        self.t = transport
        self.server = transport.server
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.n = n
        self.scope = f"unix:{n}"
        self.tr: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.uid = -1
        self.admitted = False
        self.buf = bytearray()  # the unfinished line, at most max_request_bytes
        self.discarding = False  # reading past the end of an oversized line
        self.line_started: float | None = None  # when the unfinished line's first byte came
        self.last_active = time.monotonic()  # last byte received or last answer completed
        self.pending = 0  # requests awaiting their final frame
        self.eof = False
        self.closed = False  # no more frames are written
        self._abort: asyncio.TimerHandle | None = None
        self._hup: asyncio.TimerHandle | None = None

    # -- asyncio protocol ----------------------------------------------------------
    def connection_made(self, tr) -> None:
        self.tr = tr
        self.sock = tr.get_extra_info("socket")
        try:
            pid, uid, gid = peer_credentials(self.sock)
        except OSError:
            tr.abort()
            return
        self.uid = uid
        err = self.t.admit(self, pid, uid, gid)
        if err is not None:
            self.shut(err)
            return
        self.admitted = True

    def get_buffer(self, sizehint: int):
        if self.discarding:
            room = RECV_SIZE
        else:  # one byte past the limit is enough to know a line is too long
            room = min(RECV_SIZE, self.server.config.max_request_bytes + 1 - len(self.buf))
        return memoryview(self.t.scratch)[: max(room, 1)]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        now = time.monotonic()
        self.last_active = now
        data = self.t.scratch
        view = memoryview(data)
        limit = self.server.config.max_request_bytes
        start = 0
        while start < nbytes:
            nl = data.find(b"\n", start, nbytes)
            end = nbytes if nl < 0 else nl
            if not self.discarding:
                if len(self.buf) + end - start > limit:  # refused while reading: a line never grows past the limit
                    self._write(protocol.error_frame(None, PayloadTooLarge(f"line longer than {limit} bytes")))
                    self.discarding = True
                    self.buf = bytearray()
                else:
                    self.buf += view[start:end]
            if nl < 0:
                if self.line_started is None and (self.buf or self.discarding):
                    self.line_started = now
                break
            if self.discarding:
                self.discarding = False  # the tail of the oversized line
            else:
                line, self.buf = bytes(self.buf), bytearray()
                if line.strip():
                    self._dispatch(line)
            self.line_started = None
            start = nl + 1
            if self.closed:
                break

    def eof_received(self) -> bool:
        self.eof = True
        self.buf, self.discarding, self.line_started = bytearray(), False, None  # an unfinished last line is dropped
        if self.pending <= 0:
            self.shut()  # after writing what is buffered
            return True
        self._check_hangup()  # half-closed: keep writing the answers unless the peer is gone
        return True

    def pause_writing(self) -> None:
        # The peer is not reading its answers: stop reading its requests until it does.
        if self.tr is not None:
            self.tr.pause_reading()

    def resume_writing(self) -> None:
        if self.tr is not None and not self.eof and not self.closed and not self.tr.is_closing():
            self.tr.resume_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        for h in (self._abort, self._hup):
            if h is not None:
                h.cancel()
        self._cancel_pending()
        self.t.forget(self)

    # -- requests --------------------------------------------------------------------
    def _dispatch(self, line: bytes) -> None:
        self.pending += 1
        try:
            self.server.receive(line, self)
        except Exception as e:  # receive answers every request itself; this is a bug's safety net
            log.exception("connection %d: receive failed", self.n)
            self._deliver(protocol.error_frame(None, e), True)

    def check_timeouts(self, now: float) -> None:
        if self.closed or not self.admitted:
            return
        cfg = self.t.cfg
        if cfg.line_timeout > 0 and self.line_started is not None and now - self.line_started > cfg.line_timeout:
            log.info("connection %d: line unfinished after %g s; closing", self.n, cfg.line_timeout)
            self.shut(LineTimeout(f"no end of line within {cfg.line_timeout:g} s; closing the connection"))
        elif (cfg.idle_timeout > 0 and self.pending <= 0 and self.line_started is None
              and now - self.last_active > cfg.idle_timeout):
            log.debug("connection %d: idle for %g s; closing", self.n, cfg.idle_timeout)
            self.shut(IdleTimeout(f"no request for {cfg.idle_timeout:g} s; closing the connection"))

    def _check_hangup(self) -> None:
        # Half-close (peer still reading) vs. gone: only POLLHUP tells them apart.
        self._hup = None
        if self.closed or self.pending <= 0:
            return
        fd = self.sock.fileno() if self.sock is not None else -1
        gone = fd < 0
        if not gone:
            p = select.poll()
            p.register(fd, select.POLLHUP)
            gone = bool(p.poll(0))
        if gone:
            log.info("connection %d closed with %d request(s) pending: cancelling", self.n, self.pending)
            self.closed = True
            self._cancel_pending()
            self.tr.abort()
            return
        self._hup = self.loop.call_later(0.1, self._check_hangup)

    # -- Peer ------------------------------------------------------------------------
    def send(self, frame: dict, final: bool) -> None:
        if threading.get_ident() == self._loop_thread:
            self._deliver(frame, final)
        else:  # the worker thread
            self.loop.call_soon_threadsafe(self._deliver, frame, final)

    def _deliver(self, frame: dict, final: bool) -> None:
        self._write(frame)
        if final:
            self.pending -= 1
            self.last_active = time.monotonic()
            if self.pending <= 0 and self.eof and not self.closed:
                self.shut()

    def _write(self, frame: dict) -> None:
        if self.closed or self.tr is None or self.tr.is_closing():
            return
        self.tr.write(protocol.encode(frame))

    def _cancel_pending(self) -> None:
        if self.pending > 0:
            self.server.cancel_all(self.scope)

    def shut(self, err: EdgedError | None = None) -> None:
        """Close after one last error frame (if any); a peer that does not read it within
        CLOSE_GRACE is cut off, so a closing connection never holds its descriptor long."""
        if self.closed or self.tr is None:
            return
        if err is not None:
            self._write(protocol.error_frame(None, err))
        self.closed = True
        self._cancel_pending()
        self.tr.close()
        self._abort = self.loop.call_later(CLOSE_GRACE, self.tr.abort)

    def close(self) -> None:
        self.shut()
