"""The durable journal of MQTT requests (SQLite in WAL mode, stdlib `sqlite3`).

A request is recorded with `begin()` before its QoS 1 message is acknowledged,
and closed with `finish()` when it ends. After a crash or a power cut,
`unanswered()` lists what was acknowledged but never answered, oldest first, so
the daemon can run it at start. Answered requests keep their final frame so a
redelivered copy (same requester and request id) gets that frame again instead
of running twice, across restarts too. A final frame is also kept in the row's
outbox, whole, from `finish()` until the broker has it (`sent()`, on its PUBACK):
at start, `unsent()` lists the answers and errors a crash caught between the two,
to be published again rather than lost (the prompt does not run again).

Rows and states:
- pending: recorded by `begin()`, not finished. Never evicted: the caller bounds
  how many it admits (its queue) and how large each payload is (its payload cap).
- answered: `finish(key, final)`. The payload is dropped, the final frame kept
  for redelivery. Finals of up to `FINAL_CAP` bytes (64 KiB, or `max_answer_bytes`
  if smaller) are stored whole. A larger final is not stored: the row becomes a
  marker, and a duplicate gets `("answered", None)`: it is recognised as already
  answered and must not run again, but its answer cannot be re-sent (the caller
  may tell the requester so). A streamed request's final frame is small (its text
  went out in the deltas), so only very long non-streamed answers hit this.
- gone: `finish(key, None)` deletes the row (the request was refused or failed:
  a retry with the same id must run). A request without an id (`rid` None) can
  never be matched, so its row is deleted when it finishes, answered or not.
  With an outbox (`finish(key, final, outbox=frame)`) such a row is kept, with no
  id to match, until `sent()` deletes it.

Bounds: answered rows are limited to `max_answers` rows and `max_answer_bytes`
of stored finals, evicting the oldest answered first (by the order in which
they were answered). With the defaults (1,024 rows, 4 MiB) the database file
stays below ~4.5 MB plus the pending requests (measured: 1.5 MB with 1,024
answers of 1 KB, 4.3 MB with 4 MiB of 60 KB answers, after thousands of
evictions); the WAL beside it is checkpointed every 1,000 pages and kept at
4 MiB at most, and removed when the journal is closed.

Durability. Cost per request on the development machine's disk (virtio ext4,
shared; `python -m bench.journal_cost`: begin + finish of a 305-byte request and
a 1,059-byte final, median of 2,000, five runs):

    synchronous=FULL    0.54-0.72 ms (4.9 ms in one run while the disk was busy);
                        begin() alone 0.26-0.34 ms; a bare 4 KiB fdatasync there
                        took 0.14-0.23 ms (2.4 ms in the busy run)
    synchronous=NORMAL  0.09-0.13 ms; begin() alone 0.04-0.06 ms

FULL makes two WAL syncs per request (one per commit); NORMAL syncs only at a
checkpoint (every ~1,000 pages, a few hundred requests). An SD card takes about
2-20 ms per fsync, more during its internal garbage collection, so FULL costs
about 4-40 ms per request there (begin() half of it, on paho's network thread,
before the acknowledgement) and NORMAL well under a millisecond plus a
checkpoint's two syncs every few hundred requests.

What NORMAL gives up: in WAL mode a NORMAL commit is written to the WAL but not
synced. A process crash (SIGKILL, the OOM killer, the systemd watchdog) loses
nothing, because the written pages are in the kernel's page cache; a power cut
or a kernel panic can roll back every commit since the last sync. For us that is
a request that was acknowledged to the broker (so it is never redelivered) and
is not in the journal: lost. It is also an answer whose `finish()` rolled back,
so the request runs a second time after the restart. FULL syncs the WAL before
`begin()` returns, so an acknowledgement always follows a durable record, and
before `finish()` returns. A device sends a request every few seconds at most
and a request takes seconds of generation on a Pi, so 4-40 ms against "an
acknowledged request is never lost, a power cut included" is the trade we take:
the default is FULL. NORMAL is for boards that cannot lose power abruptly (a
UPS) or where losing the last requests on a power cut is acceptable.

Locking: one connection in exclusive locking mode (no shared-memory file; a
second process opening the same journal gets "in use" instead of sharing it),
shared by paho's network thread and the worker thread under one lock.

A database that cannot be read at start (not SQLite, corrupt, or another
program's) is renamed aside with a timestamp suffix and an error is logged; the
journal starts empty instead of failing every start. A journal held by another
process is an error (it is not renamed). Errors while running (disk full, I/O)
are raised to the caller: a `begin()` that raises must not be acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edged.journal")

APPLICATION_ID = 0x65646A31  # "edj1": marks the file as an edged journal
SCHEMA_VERSION = 2  # 2: the outbox column
FINAL_CAP = 64 << 10  # largest final frame stored for redelivery
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
_PENDING = 0  # state of a recorded, unfinished request; 1 answered; 2 ended unmatchable, outbox unsent

_SCHEMA = """
CREATE TABLE requests (
    key INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale key cannot hit a newer row
    requester TEXT NOT NULL,
    rid TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    properties TEXT NOT NULL,
    created REAL NOT NULL,
    state INTEGER NOT NULL,                  -- 0 pending, 1 answered, 2 ended with its outbox unsent
    final BLOB,                              -- NULL when answered but too large to keep
    final_len INTEGER NOT NULL DEFAULT 0,    -- bytes stored in final
    answered INTEGER,                        -- order of answering, for eviction
    outbox BLOB                              -- final frame not yet acknowledged by the broker
);
CREATE UNIQUE INDEX requests_rid ON requests(requester, rid) WHERE rid IS NOT NULL;
CREATE INDEX requests_answered ON requests(answered) WHERE state = 1;
"""


@dataclass(frozen=True)
class Entry:
    key: int  # row id
    requester: str  # who asked: the reply topic, or a device identity and its reply topic
    rid: str | None  # request id (or correlation data as text); None: cannot be deduplicated
    topic: str  # the topic it arrived on
    payload: bytes
    properties: dict  # JSON-able: response_topic, correlation_data (hex), expiry_at (unix time or None)


class JournalInUse(RuntimeError):
    """Another process has the journal open."""


class _Unusable(Exception):
    """The file is a readable database, but not a journal this code can use."""


class Journal:
    def __init__(self, path: str | os.PathLike, *, synchronous: str = "FULL", max_answers: int = 1024,
                 max_answer_bytes: int = 4 << 20):
        sync = synchronous.upper()
        if sync not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNC_MODES)}, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = sync
        self.max_answers = max(0, int(max_answers))
        self.max_answer_bytes = max(0, int(max_answer_bytes))
        self.final_cap = min(FINAL_CAP, self.max_answer_bytes)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        _make_dirs(self.path.parent)
        try:
            self._open()
        except (sqlite3.DatabaseError, _Unusable) as e:
            if _busy(e):
                raise JournalInUse(f"journal {self.path} is in use by another process") from e
            self._discard_connection()
            aside = self._move_aside()
            log.error("journal %s is unreadable (%s); moved it to %s and started empty: requests it held "
                      "that were acknowledged but not answered are lost", self.path, e, aside)
            try:
                self._open()
            except BaseException:
                self._discard_connection()
                raise

    # -- opening ---------------------------------------------------------------
    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)  # it holds prompts: the owner only
        finally:
            os.close(fd)
        conn = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        self._conn = conn
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no -shm file, one process only
        # Identify the file before changing anything in it (another program's database stays as it was).
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if tables and app != APPLICATION_ID:
            raise _Unusable(f"not an edged journal (application_id {app:#x})")
        if tables and version not in (1, SCHEMA_VERSION):
            raise _Unusable(f"journal schema version {version}, this edged reads {SCHEMA_VERSION}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _Unusable(f"cannot use WAL mode (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA journal_size_limit=4194304")  # WAL truncated back to 4 MiB after a checkpoint
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(problems[:3]))
        if not tables:
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA application_id={APPLICATION_ID};"
                               f" PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")  # all or nothing
        elif version == 1:  # written by an edged without the outbox: add it
            conn.executescript(f"BEGIN IMMEDIATE; ALTER TABLE requests ADD COLUMN outbox BLOB;"
                               f" PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        n, size, seq = conn.execute(
            "SELECT count(*), coalesce(sum(final_len), 0), coalesce(max(answered), 0) FROM requests WHERE state = 1"
        ).fetchone()
        self._answers, self._answer_bytes, self._seq = n, size, seq
        if n > self.max_answers or size > self.max_answer_bytes:  # the bounds were lowered
            conn.execute("BEGIN IMMEDIATE")
            try:
                counts = self._evict(n, size)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._answers, self._answer_bytes = counts

    def _discard_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):  # never replay an old WAL into the new file
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        return aside

    # -- API -------------------------------------------------------------------
    def begin(self, requester: str, rid: str | None, topic: str, payload: bytes,
              properties: dict) -> tuple[int, str, bytes | None]:
        """Record a request before it is acknowledged. Returns (key, state, final):
        "new" (recorded now, durably with synchronous=FULL), "pending" (a copy with the
        same requester and rid is recorded and unanswered: the key is that copy's),
        or "answered" (final = the stored final frame, or None when it was too large
        to keep: the request was answered and must not run again).
        With rid None nothing can be matched: always "new"."""
        props = json.dumps(properties, separators=(",", ":"))
        with self._lock:
            conn = self._conn
            if rid is not None:
                row = conn.execute("SELECT key, state, final FROM requests WHERE requester = ? AND rid = ?",
                                   (requester, rid)).fetchone()
                if row is not None:
                    key, state, final = row
                    return (key, "pending", None) if state == _PENDING else (key, "answered", final)
            cur = conn.execute(
                "INSERT INTO requests (requester, rid, topic, payload, properties, created, state) VALUES (?, ?, ?, ?, ?, ?, 0)",
                (requester, rid, topic, bytes(payload), props, time.time()))
            return cur.lastrowid, "new", None

    def finish(self, key: int, final: bytes | None, *, outbox: bytes | None = None) -> None:
        """The request ended: keep its final frame (an answer, for redelivery) or, with
        None, drop the row (it was refused or failed: a retry with the same id must run).
        `outbox`: the frame about to be published, kept whole with the reply address
        until `sent(key)`; a row that would be dropped stays, unmatchable, until then.
        A key that is unknown or already answered is left as it is."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT rid, state FROM requests WHERE key = ?", (key,)).fetchone()
                seq, counts = self._seq, (self._answers, self._answer_bytes)
                kept = "properties" if outbox is not None else "'{}'"  # the reply address, for a re-send
                if row is None or row[1] != _PENDING:
                    pass
                elif (final is None or row[0] is None) and outbox is None:
                    conn.execute("DELETE FROM requests WHERE key = ?", (key,))
                elif final is None or row[0] is None:
                    conn.execute("UPDATE requests SET state = 2, rid = NULL, payload = X'', outbox = ? WHERE key = ?",
                                 (bytes(outbox), key))
                else:
                    stored = bytes(final) if len(final) <= self.final_cap else None  # None: the marker
                    size = len(stored) if stored is not None else 0
                    seq += 1
                    conn.execute(
                        f"UPDATE requests SET state = 1, final = ?, final_len = ?, answered = ?, payload = X'',"
                        f" properties = {kept}, outbox = ? WHERE key = ?",
                        (stored, size, seq, None if outbox is None else bytes(outbox), key))
                    counts = self._evict(self._answers + 1, self._answer_bytes + size)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._seq, (self._answers, self._answer_bytes) = seq, counts

    def sent(self, key: int) -> None:
        """The broker has the row's outbox: forget it (and the row, if nothing else keeps it).

        Not synced (the next synced commit carries it to disk): lost in a power cut, it
        only makes the next run send that frame once more, and a sync here would be a
        third one per request on paho's network thread."""
        with self._lock:
            conn = self._conn
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM requests WHERE key = ? AND state = 2", (key,))
                conn.execute("UPDATE requests SET outbox = NULL, properties = '{}' WHERE key = ? AND outbox IS NOT NULL",
                             (key,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def unsent(self) -> list[tuple[int, dict, bytes]]:
        """(key, properties, frame) of every final frame the broker never acknowledged, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, properties, outbox FROM requests WHERE outbox IS NOT NULL ORDER BY key").fetchall()
        return [(k, json.loads(props), bytes(out)) for k, props, out in rows]

    def unanswered(self) -> list[Entry]:
        """Recorded requests that were never finished, oldest first (for replay at start)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, requester, rid, topic, payload, properties FROM requests WHERE state = 0 ORDER BY key"
            ).fetchall()
        return [Entry(k, req, rid, topic, bytes(payload), json.loads(props)) for k, req, rid, topic, payload, props in rows]

    def stats(self) -> dict:
        """Row counts and stored answer bytes (for status and tests)."""
        with self._lock:
            pending = self._conn.execute("SELECT count(*) FROM requests WHERE state = 0").fetchone()[0]
            unsent = self._conn.execute("SELECT count(*) FROM requests WHERE outbox IS NOT NULL").fetchone()[0]
            return {"pending": pending, "answers": self._answers, "answer_bytes": self._answer_bytes, "unsent": unsent}

    def close(self) -> None:
        with self._lock:
            self._discard_connection()

    # -- internals ---------------------------------------------------------------
    def _evict(self, n: int, size: int) -> tuple[int, int]:
        """Delete the oldest answered rows until both bounds hold (inside a transaction)."""
        conn = self._conn
        while n > self.max_answers or size > self.max_answer_bytes:
            row = conn.execute("SELECT key, final_len FROM requests WHERE state = 1 ORDER BY answered LIMIT 1").fetchone()
            if row is None:
                break
            conn.execute("DELETE FROM requests WHERE key = ?", (row[0],))
            n, size = n - 1, size - row[1]
        return n, size


def _make_dirs(d: Path) -> None:
    """Create missing parents with mode 0700 (os.makedirs gives intermediate ones the umask default)."""
    missing = []
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass


def _busy(e: BaseException) -> bool:
    if not isinstance(e, sqlite3.Error):
        return False
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(e) or "busy" in str(e)
