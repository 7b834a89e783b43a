"""The MQTT request journal (edged.transports.journal): a real SQLite file on disk,
reopened, damaged, and held by a process that is SIGKILLed."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edged.transports.journal import FINAL_CAP, Entry, Journal, JournalInUse

REPO = Path(__file__).resolve().parent.parent
PROPS = {"response_topic": "dev/1/reply", "correlation_data": "6964", "expiry_at": None}


def _req(j: Journal, rid, requester="dev/1/reply", payload=b'{"prompt":"hi"}'):
    return j.begin(requester, rid, "edged/n/request", payload, PROPS)


def test_begin_finish_and_unanswered(tmp_path):
    j = Journal(tmp_path / "j.db")
    a, state, final = _req(j, "a", payload=b"A" * 300)
    assert (state, final) == ("new", None)
    b, _, _ = _req(j, "b")
    c, _, _ = _req(j, None, payload=b"C")
    d, _, _ = _req(j, "d", requester="dev/2/reply")
    assert len({a, b, c, d}) == 4
    j.finish(b, b'{"done":true}')  # answered
    j.finish(d, None)  # refused
    left = j.unanswered()
    assert left == [Entry(a, "dev/1/reply", "a", "edged/n/request", b"A" * 300, PROPS),
                    Entry(c, "dev/1/reply", None, "edged/n/request", b"C", PROPS)]
    j.close()


def test_duplicates(tmp_path):
    j = Journal(tmp_path / "j.db")
    k, state, _ = _req(j, "x")
    assert state == "new"
    assert _req(j, "x") == (k, "pending", None)  # a copy while the first still runs
    assert _req(j, "x", requester="dev/2/reply")[1] == "new"  # ids are per requester
    j.finish(k, b"answer-x")
    assert _req(j, "x") == (k, "answered", b"answer-x")
    j.finish(k, b"another answer")  # finishing twice keeps the first answer
    assert _req(j, "x") == (k, "answered", b"answer-x")

    r, _, _ = _req(j, "refused")
    j.finish(r, None)
    r2, state, _ = _req(j, "refused")  # a retry after an error runs again
    assert state == "new" and r2 != r

    n1, s1, _ = _req(j, None)
    n2, s2, _ = _req(j, None)
    assert (s1, s2) == ("new", "new") and n1 != n2
    j.finish(n1, b"no id: nothing can match it")
    assert j.stats()["answers"] == 1  # only x's answer is kept

    j.finish(10_000, b"unknown key")  # ignored
    assert [e.rid for e in j.unanswered()] == ["x", "refused", None]
    j.close()


def test_answers_bounded_in_count_oldest_answered_first(tmp_path):
    j = Journal(tmp_path / "j.db", max_answers=3)
    keys = [_req(j, f"r{i}")[0] for i in range(6)]
    pending = [_req(j, f"p{i}")[0] for i in range(10)]
    # answered in the order r4, r0, r1, r2, r3: r4 and r0 go first
    for i in (4, 0, 1, 2, 3):
        j.finish(keys[i], f"final {i}".encode())
    assert [_req(j, f"r{i}")[1] for i in (1, 2, 3)] == ["answered"] * 3
    assert _req(j, "r5")[1] == "pending"
    assert _req(j, "r4")[1] == "new" and _req(j, "r0")[1] == "new"  # evicted: they would run again
    assert j.stats()["answers"] == 3
    # pending rows are never evicted, however many there are
    assert [e.key for e in j.unanswered()][:11] == [keys[5], *pending]
    j.close()


def test_answers_bounded_in_bytes(tmp_path):
    j = Journal(tmp_path / "j.db", max_answer_bytes=1000)
    for i in range(10):
        k, _, _ = _req(j, f"r{i}")
        j.finish(k, bytes([65 + i]) * 300)
        assert j.stats()["answer_bytes"] <= 1000
    st = j.stats()
    assert st == {"pending": 0, "answers": 3, "answer_bytes": 900, "unsent": 0}
    assert [_req(j, f"r{i}")[2] for i in (7, 8, 9)] == [bytes([65 + i]) * 300 for i in (7, 8, 9)]
    assert _req(j, "r6")[1] == "new"
    j.close()


def test_final_too_large_is_a_marker(tmp_path):
    j = Journal(tmp_path / "j.db")
    k, _, _ = _req(j, "big")
    j.finish(k, b"x" * (FINAL_CAP + 1))
    # still recognised as answered (not run twice), but the frame is not kept
    assert _req(j, "big") == (k, "answered", None)
    assert j.stats() == {"pending": 0, "answers": 1, "answer_bytes": 0, "unsent": 0}
    k2, _, _ = _req(j, "fits")
    j.finish(k2, b"y" * FINAL_CAP)
    assert _req(j, "fits") == (k2, "answered", b"y" * FINAL_CAP)
    j.close()


def test_survives_reopen_and_lowered_bounds(tmp_path):
    path = tmp_path / "j.db"
    j = Journal(path)
    done = []
    for i in range(5):
        k, _, _ = _req(j, f"d{i}")
        j.finish(k, f"answer {i}".encode())
        done.append(k)
    p, _, _ = _req(j, "still running", payload=b"P" * 300)
    j.close()

    j = Journal(path)
    assert [(e.key, e.rid, e.payload) for e in j.unanswered()] == [(p, "still running", b"P" * 300)]
    assert _req(j, "d3") == (done[3], "answered", b"answer 3")
    k, state, _ = _req(j, "after")
    assert state == "new" and k > p  # keys keep growing across restarts
    j.close()

    j = Journal(path, max_answers=2)  # the bounds apply to what was kept before
    assert j.stats()["answers"] == 2
    assert [_req(j, f"d{i}")[1] for i in range(5)] == ["new", "new", "new", "answered", "answered"]
    j.close()


def test_outbox_until_the_broker_has_it(tmp_path):
    path = tmp_path / "j.db"
    j = Journal(path)
    a, _, _ = _req(j, "a")
    e, _, _ = _req(j, "e")
    n, _, _ = _req(j, None)
    big, _, _ = _req(j, "big")
    j.finish(a, b"answer-a", outbox=b"answer-a")
    j.finish(e, None, outbox=b"error-e")  # refused: kept only to be sent
    j.finish(n, b"answer-n", outbox=b"answer-n")  # no id: nothing can match it
    j.finish(big, b"x" * (FINAL_CAP + 1), outbox=b"x" * (FINAL_CAP + 1))
    j.close()

    j = Journal(path)  # a crash before any PUBACK: all four are re-sent, to where they were going
    assert j.unsent() == [(a, PROPS, b"answer-a"), (e, PROPS, b"error-e"), (n, PROPS, b"answer-n"),
                          (big, PROPS, b"x" * (FINAL_CAP + 1))]  # the outbox is whole, above the cap too
    assert j.unanswered() == []  # none runs again
    assert _req(j, "a") == (a, "answered", b"answer-a")
    assert _req(j, "e")[1] == "new"  # a retry after an error runs again, its error still unsent
    assert _req(j, "big") == (big, "answered", None)
    for k in (a, e, n, big):
        j.sent(k)
    assert j.unsent() == [] and j.stats()["unsent"] == 0
    assert _req(j, "a") == (a, "answered", b"answer-a")  # still recognised after the PUBACK
    j.sent(10_000)  # unknown: ignored
    j.close()


def test_version_1_journal_gets_the_outbox(tmp_path):
    from edged.transports.journal import APPLICATION_ID

    path = tmp_path / "j.db"
    conn = sqlite3.connect(path)  # as an edged before the outbox left it
    conn.executescript(f"""
        CREATE TABLE requests (key INTEGER PRIMARY KEY AUTOINCREMENT, requester TEXT NOT NULL, rid TEXT,
            topic TEXT NOT NULL, payload BLOB NOT NULL, properties TEXT NOT NULL, created REAL NOT NULL,
            state INTEGER NOT NULL, final BLOB, final_len INTEGER NOT NULL DEFAULT 0, answered INTEGER);
        CREATE UNIQUE INDEX requests_rid ON requests(requester, rid) WHERE rid IS NOT NULL;
        CREATE INDEX requests_answered ON requests(answered) WHERE state = 1;
        INSERT INTO requests VALUES (1, 'dev/1/reply', 'old', 't', X'', '{{}}', 0, 1, X'616e73776572', 6, 1);
        INSERT INTO requests VALUES (2, 'dev/1/reply', 'pending', 't', X'70', '{{}}', 0, 0, NULL, 0, NULL);
        PRAGMA application_id={APPLICATION_ID}; PRAGMA user_version=1;""")
    conn.close()
    j = Journal(path)
    assert _req(j, "old") == (1, "answered", b"answer")
    assert [(x.key, x.payload) for x in j.unanswered()] == [(2, b"p")] and j.unsent() == []
    j.finish(2, b"answer-p", outbox=b"answer-p")
    assert j.unsent() == [(2, {}, b"answer-p")]
    j.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


_CHILD = textwrap.dedent("""
    import sys
    from edged.transports.journal import Journal
    j = Journal(sys.argv[1], synchronous=sys.argv[2])
    i = 0
    while True:
        key, state, _ = j.begin("dev/1/reply", f"r{i}", "edged/n/request", b"%d" % i * 50, {"expiry_at": None})
        if i % 3 == 0:
            j.finish(key, b"answer %d" % i)
        print(key, i, i % 3 == 0, flush=True)   # after begin()/finish() returned: "acknowledged"
        i += 1
""")


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_sigkill_right_after_begin_keeps_the_entry(tmp_path, synchronous):
    path = tmp_path / "j.db"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), synchronous], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            key, i, answered = line.split()
            acked.append((int(key), int(i), answered == "True"))
            if len(acked) == 40:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    j = Journal(path, synchronous=synchronous)
    pending = {e.key: e for e in j.unanswered()}
    for key, i, answered in acked:
        if answered:
            assert _req(j, f"r{i}") == (key, "answered", b"answer %d" % i)
        else:
            assert pending[key].rid == f"r{i}" and pending[key].payload == b"%d" % i * 50
    j.close()


def test_file_modes(tmp_path):
    path = tmp_path / "state" / "edged" / "j.db"
    old = os.umask(0o022)
    try:
        j = Journal(path)
        _req(j, "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(f"{path}-wal").stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
        assert not Path(f"{path}-shm").exists()  # exclusive locking: no shared memory file
        j.close()
        os.chmod(path, 0o644)
        Journal(path).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def _aside(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm")))


def _check_moved_aside(path, original: bytes, caplog):
    j = Journal(path)
    assert j.unanswered() == [] and j.stats()["answers"] == 0
    k, state, _ = _req(j, "fresh")
    assert state == "new"
    j.close()
    aside = _aside(path)
    assert len(aside) == 1 and aside[0].read_bytes() == original
    assert any(r.levelno == logging.ERROR and "moved it to" in r.getMessage() for r in caplog.records)
    assert [e.rid for e in Journal(path).unanswered()] == ["fresh"]


def test_garbage_file_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "j.db"
    path.write_bytes(b"not a database at all\n" * 500)
    _check_moved_aside(path, path.read_bytes(), caplog)


@pytest.mark.parametrize("where", ["interior", "last leaf"])
def test_damaged_pages_are_moved_aside(tmp_path, caplog, where):
    path = tmp_path / "j.db"
    j = Journal(path)
    for i in range(300):
        _req(j, f"r{i}", payload=os.urandom(300))
    j.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 16 * 4096
    if where == "interior":
        data[3 * 4096:5 * 4096] = b"\xa5" * (2 * 4096)  # two b-tree pages overwritten
    else:
        data[-4096 + 8:] = b"\xa5" * (4096 - 8)  # a page of pending rows that opening alone would not read
    path.write_bytes(bytes(data))
    _check_moved_aside(path, bytes(data), caplog)


def test_another_programs_database_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "j.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE notes (t TEXT)")
    other.execute("INSERT INTO notes VALUES ('keep me')")
    other.commit()
    other.close()
    _check_moved_aside(path, path.read_bytes(), caplog)
    assert sqlite3.connect(_aside(path)[0]).execute("SELECT t FROM notes").fetchall() == [("keep me",)]


def test_journal_held_by_another_process_is_not_moved(tmp_path):
    path = tmp_path / "j.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom edged.transports.journal import Journal\n"
         "j = Journal(sys.argv[1]); j.begin('r', 'x', 't', b'p', {}); print('ready', flush=True); time.sleep(60)",
         str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(JournalInUse):
            Journal(path)
        assert _aside(path) == []
    finally:
        holder.kill()
        holder.wait()
    assert [e.rid for e in Journal(path).unanswered()] == ["x"]


def test_two_threads(tmp_path):
    j = Journal(tmp_path / "j.db", synchronous="NORMAL")
    keys: dict[str, list[int]] = {}

    def work(name):
        mine = keys.setdefault(name, [])
        for i in range(150):
            k, state, _ = _req(j, f"{name}{i}", requester=name)
            assert state == "new"
            mine.append(k)
            if i % 2:
                j.finish(k, b"done")

    threads = [threading.Thread(target=work, args=(n,)) for n in ("net", "worker")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys["net"]) | set(keys["worker"])) == 300
    assert j.stats() == {"pending": 150, "answers": 150, "answer_bytes": 600, "unsent": 0}
    j.close()


def test_bad_synchronous_mode(tmp_path):
    with pytest.raises(ValueError):
        Journal(tmp_path / "j.db", synchronous="SOMETIMES")
