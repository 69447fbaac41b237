"""The state database: lock, persistence, and the corrupt-database corpus (SPEC section 11)."""

import os
import sqlite3

import pytest
from conftest import wait_for
from trainsup.daemon.state import LockHeld, StateDB, StateLock, StateUnusable


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    a = StateLock(tmp_path)
    a.acquire()
    with pytest.raises(LockHeld) as e:
        StateLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in str(e.value)
    a.release()
    StateLock(tmp_path).acquire()


def test_jobs_and_events_survive_reopen(tmp_path):
    db = StateDB(tmp_path)
    db.save_job("j", {"attempt": 3, "restarts": 2})
    db.add_event("j", "launch", {"attempt": 3})
    db.close()
    db = StateDB(tmp_path)
    assert db.load_job("j")["attempt"] == 3
    assert db.events("j")[-1]["kind"] == "launch"


def _future_version(p):
    c = sqlite3.connect(p)
    c.execute("PRAGMA user_version=99")
    c.commit()
    c.close()


def _wrong_schema(p):
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE jobs (x INTEGER)")
    c.commit()
    c.close()


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(os.urandom(8192)),
    lambda p: p.write_bytes(p.read_bytes()[:1500]),
    _wrong_schema,
], ids=["empty", "random", "truncated", "wrong-schema"])
def test_corrupt_database_is_moved_aside_and_a_fresh_one_starts(tmp_path, damage, caplog):
    db = StateDB(tmp_path)
    for i in range(50):
        db.add_event("j", "launch", {"i": i, "pad": "x" * 200})
    db.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / ("state.db" + suffix)).unlink(missing_ok=True)
    p = tmp_path / "state.db"
    if damage is _wrong_schema:
        p.unlink()
    damage(p)
    db = StateDB(tmp_path)
    aside = list(tmp_path.glob("state.db.corrupt-*"))
    assert db.moved_aside is not None and aside, "the damaged database must be kept aside"
    assert "CORRUPT" in caplog.text
    db.save_job("j", {"attempt": 1})
    assert db.load_job("j") == {"attempt": 1}


def test_newer_schema_is_refused_not_moved_aside(tmp_path):
    """A database from a newer trainsup is not corrupt: moving it aside would lose what a
    downgrade can still hand back to the newer version."""
    db = StateDB(tmp_path)
    db.save_job("j", {"attempt": 4})
    db.close()
    _future_version(tmp_path / "state.db")
    with pytest.raises(StateUnusable) as e:
        StateDB(tmp_path)
    assert "newer" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("state.db.corrupt-*"))


def test_only_sqlites_corruption_verdicts_count_as_corrupt(tmp_path):
    """A read-only database, a missing directory: errors about the place, not the data."""
    from trainsup.daemon.state import is_corruption
    good = tmp_path / "good.db"
    c = sqlite3.connect(good)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    ro = sqlite3.connect(f"file:{good}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as readonly:
        ro.execute("INSERT INTO t VALUES (1)")
    ro.close()
    with pytest.raises(sqlite3.Error) as cantopen:
        sqlite3.connect(tmp_path / "no" / "such" / "dir.db").execute("SELECT 1")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x13" * 8192)
    with pytest.raises(sqlite3.Error) as notadb:
        sqlite3.connect(junk).execute("PRAGMA quick_check").fetchall()
    assert not is_corruption(readonly.value)
    assert not is_corruption(cantopen.value)
    assert is_corruption(notadb.value)


def test_records_held_by_another_process_wait_in_order_and_stay_bounded(tmp_path, caplog):
    """While another process holds the database (a backup, sqlite3 by hand) the writer
    thread keeps the records and retries; held long, the oldest history records go first
    (job rows stay) so the daemon's memory is bounded. A real second connection holds it."""
    import sqlite3

    db = StateDB(tmp_path)
    db.max_held = 50
    db.start_writer()
    db.on_pending = db.wake
    holder = sqlite3.connect(db.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(200):
            db.add_event("j", "tick", {"i": i})
        db.save_job("j", {"attempt": 3})
        # the writer meets the lock (after SQLite's 2 s busy timeout) and trims what waits
        wait_for(lambda: any("oldest history records dropped" in r.message for r in caplog.records), 15,
                 "the writer to find the database held", 0.05)
    finally:
        holder.execute("COMMIT")
        holder.close()

    def drained() -> bool:
        db.wake()
        return not db._pending
    wait_for(drained, 10, "what waited to be written", 0.05)
    events = db.events("j", 1000)
    assert [e["i"] for e in events] == list(range(200 - len(events), 200)), "the newest, in order"
    assert 40 <= len(events) <= 60, len(events)
    assert db.load_job("j") == {"attempt": 3}          # job rows are never dropped
    db.close()
