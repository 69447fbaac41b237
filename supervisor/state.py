"""The daemon's durable state: SQLite (WAL) in state_dir, guarded by an exclusive lock.

Holds per-job counters (attempt, restarts, pins, the running pid with its start time),
the event history that `status` and `history` read, and the checkpoint verdict cache.
A corrupt or foreign database is moved aside as state.db.corrupt-<time> and a fresh one
is started (SPEC section 11): losing history is better than not supervising.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from .crashpoints import crash_point
from typing import Any, Callable, Optional

log = logging.getLogger("trainsup.state")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job, id);
CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    verdict TEXT NOT NULL
);
"""
_MAX_EVENTS_PER_JOB = 5000


class LockHeld(Exception):
    def __init__(self, path: Path, pid: str):
        super().__init__(f"state dir {path.parent} is in use by another trainsup daemon (pid {pid or '?'}); "
                         f"stop it first or use --state DIR")
        self.pid = pid


class StateLock:
    """flock on state_dir/lock for the daemon's lifetime; the file says who holds it."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "lock"
        self.fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateDB:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "state.db"
        self.conn = self._open()
        # Writes are queued and committed together, one transaction per turn of the
        # daemon's loop (`on_pending` schedules the flush): an exit and its relaunch cost
        # one commit, not nine. Durable points (a spawned pid, a deletion about to happen)
        # call flush() themselves before going on.
        self._pending: list[tuple[str, tuple]] = []
        self.on_pending: Optional[Callable[[], None]] = None
        self.lock = threading.RLock()    # the hashing threads use the verdict cache

    # -- opening, with corruption handling -------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=2000")
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version} is newer than this trainsup ({SCHEMA_VERSION})")
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {ok}")
        conn.executescript(_SCHEMA)
        # A wrong schema (a foreign db with our table names) fails here.
        conn.execute("SELECT name, data FROM jobs LIMIT 1").fetchall()
        conn.execute("SELECT id, job, at, kind, data FROM events LIMIT 1").fetchall()
        conn.execute("SELECT key, verdict FROM verdicts LIMIT 1").fetchall()
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.path.exists() and self.path.stat().st_size == 0:
                # SQLite takes an empty file as a new database; for us it is a truncated one.
                raise sqlite3.DatabaseError("file is empty (truncated)")
            conn = self._connect()
            self._check(conn)
            return conn
        except sqlite3.DatabaseError as e:
            try:
                conn.close()  # type: ignore[possibly-undefined]
            except Exception:
                pass
            conn = None
            aside = self.path.with_name(f"state.db.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            log.error("STATE DATABASE %s IS CORRUPT (%s): moved aside to %s; starting a fresh one "
                      "(history and counters are lost; checkpoints are untouched)", self.path, e, aside)
            self.moved_aside = aside
            conn = self._connect()
            self._check(conn)
            return conn

    moved_aside: Path | None = None

    def close(self) -> None:
        self.flush()
        self.conn.close()

    def _queue(self, sql: str, params: tuple) -> None:
        self._pending.append((sql, params))
        if self.on_pending is None:
            self.flush()
        elif len(self._pending) == 1:
            self.on_pending()

    def flush(self) -> None:
        """Commit queued writes in one transaction. On failure (ENOSPC...) they are
        dropped and the previous state stays intact; supervision goes on."""
        with self.lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                for sql, params in batch:
                    self.conn.execute(sql, params)
                self.conn.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                log.error("state: cannot write %d records: %s (previous state kept)", len(batch), e)

    # -- jobs ---------------------------------------------------------------------
    def load_job(self, name: str) -> dict[str, Any]:
        self.flush()
        row = self.conn.execute("SELECT data FROM jobs WHERE name=?", (name,)).fetchone()
        if not row:
            return {}
        try:
            data = json.loads(row[0])
            return data if isinstance(data, dict) else {}
        except ValueError:
            return {}

    def save_job(self, name: str, data: dict[str, Any]) -> None:
        crash_point("state-write")
        self._queue("INSERT INTO jobs(name, data) VALUES(?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET data=excluded.data", (name, json.dumps(data)))

    # -- events -------------------------------------------------------------------
    def add_event(self, job: str, kind: str, data: dict[str, Any], at: float | None = None) -> dict:
        at = time.time() if at is None else at
        ev = {"job": job, "at": at, "kind": kind, **data}
        crash_point("record")
        self._queue("INSERT INTO events(job, at, kind, data) VALUES(?,?,?,?)", (job, at, kind, json.dumps(data)))
        self._since_trim += 1
        if self._since_trim >= 500:
            self._since_trim = 0
            self._queue("DELETE FROM events WHERE id <= (SELECT id FROM events WHERE job=? "
                        "ORDER BY id DESC LIMIT 1 OFFSET ?) AND job=?", (job, _MAX_EVENTS_PER_JOB, job))
        return ev

    _since_trim = 0

    def events(self, job: str, limit: int = 50) -> list[dict]:
        self.flush()
        rows = self.conn.execute("SELECT at, kind, data FROM events WHERE job=? ORDER BY id DESC LIMIT ?",
                                 (job, limit)).fetchall()
        out = []
        for at, kind, data in reversed(rows):
            try:
                d = json.loads(data)
            except ValueError:
                d = {}
            out.append({"at": at, "kind": kind, **d})
        return out

    # -- verdict cache (trainsup.checkpoint.validate's VerdictCache protocol) ----------
    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.conn.execute("SELECT verdict FROM verdicts WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, verdict: str) -> None:
        with self.lock:
            try:
                self.conn.execute("INSERT OR REPLACE INTO verdicts(key, verdict) VALUES(?,?)", (key, verdict))
            except sqlite3.Error as e:
                log.warning("state: cannot cache verdict: %s", e)
