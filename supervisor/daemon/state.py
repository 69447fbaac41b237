"""The daemon's durable state: SQLite (WAL) in state_dir, guarded by an exclusive lock.

Holds per-job counters (attempt, restarts, pins, the running pid with its start time),
the event history that `status` and `history` read, and the checkpoint verdict cache.
A database that SQLite itself says is corrupt (a failed `PRAGMA quick_check`, SQLITE_CORRUPT,
SQLITE_NOTADB) or that is foreign is moved aside as state.db.corrupt-<time> and a fresh one
is started (SPEC section 11): losing history is better than not supervising. Anything else
(a full disk, a read-only or unreadable state dir, I/O errors) says nothing about the data:
the daemon then refuses to start with one line (StateUnusable) and moves nothing — a
healthy database once went aside on ENOSPC, taking pins, counters and history with it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..crashpoints import crash_point

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
# SQLite primary result codes that are a verdict on the file's contents.
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_BUSY = (5, 6)                 # SQLITE_BUSY, SQLITE_LOCKED: someone else holds the database
_BUSY_RETRY_S = 0.25
_MAX_HELD = 100_000            # records kept in memory while another process holds the db
_EVENT_INSERT = "INSERT INTO events"


class StateUnusable(Exception):
    """The state dir or database cannot be used right now (full, read-only, I/O error,
    written by a newer trainsup): one line, exit 2, nothing moved."""


class Corrupt(sqlite3.DatabaseError):
    """The database's contents are bad or foreign: it may be moved aside."""


def is_corruption(e: sqlite3.Error) -> bool:
    """True only for SQLite's own verdict that the file is damaged or not a database."""
    if isinstance(e, Corrupt):
        return True
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(e).lower()         # Pythons without sqlite_errorcode
    return "malformed" in text or "not a database" in text


def _unusable(what: str, path: Path, e: BaseException) -> StateUnusable:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return StateUnusable(f"cannot {what} {path}: {reason}; nothing was moved or changed "
                         "(free space, fix permissions or the mount, then start again)")


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

    def acquire(self, inherited: int | None = None) -> None:
        """Raises LockHeld, or StateUnusable when the state dir cannot be written.
        `inherited`: the fd of this lock, already held, handed over by `trainsup reexec`."""
        if inherited is not None:
            try:
                held, here = os.fstat(inherited), os.stat(self.path)
                if (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino):
                    fcntl.flock(inherited, fcntl.LOCK_EX | fcntl.LOCK_NB)   # ours already: no wait
                    self.fd = inherited
                    return
            except OSError:
                pass
            try:
                os.close(inherited)
            except OSError:
                pass
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            # not a job path: the daemon's state db
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise _unusable("use the state dir", self.path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(self.path, holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            # The pid is only for the "in use by pid N" message; the flock is the lock.
            log.warning("state: cannot record the daemon's pid in %s: %s", self.path, e.strerror)
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
        # daemon's loop (`on_pending` schedules the commit): an exit and its relaunch cost
        # one commit, not nine. Durable points (a spawned pid, a deletion about to happen)
        # call flush() themselves before going on. With start_writer() the commits run on
        # a thread of their own: a commit, and the WAL checkpoint SQLite runs inside one
        # (two fsyncs), took 1.5 s on a disk busy deleting a 10 GiB checkpoint, and the
        # loop that answers `status` must not wait for that.
        self._pending: list[tuple[str, tuple]] = []
        self._qlock = threading.Lock()   # guards _pending only: never held across I/O
        self.on_pending: Callable[[], None] | None = None
        self.lock = threading.RLock()    # the connection: writer thread, hashing threads
        self._writer: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = False
        self._retry_busy = False
        self._busy_since: float | None = None
        self.max_held = _MAX_HELD

    # -- opening, with corruption handling -------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=2000")
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        """Raises Corrupt for a damaged or foreign database, StateUnusable for a newer
        one, and lets every other sqlite3 error through (the caller sorts them)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateUnusable(f"state database {self.path} has schema version {version}, newer than "
                                f"this trainsup ({SCHEMA_VERSION}); run the newer trainsup or use --state DIR")
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise Corrupt(f"integrity check failed: {ok}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"jobs", "events", "verdicts"} <= tables:
            conn.executescript(_SCHEMA)          # writes only when something is missing
        try:
            # A wrong schema (a foreign db with our table names) fails here.
            conn.execute("SELECT name, data FROM jobs LIMIT 1").fetchall()
            conn.execute("SELECT id, job, at, kind, data FROM events LIMIT 1").fetchall()
            conn.execute("SELECT key, verdict FROM verdicts LIMIT 1").fetchall()
        except sqlite3.OperationalError as e:
            if "no such column" in str(e):
                raise Corrupt(f"not a trainsup database ({e})") from None
            raise
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _open(self) -> sqlite3.Connection:
        """The checked connection. Raises StateUnusable for anything but corruption."""
        conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size == 0:
                # SQLite takes an empty file as a new database; for us it is a truncated one.
                raise Corrupt("file is empty (truncated)")
            conn = self._connect()
            self._check(conn)
            return conn
        except OSError as e:
            raise _unusable("open the state database", self.path, e) from None
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            if not is_corruption(e):
                raise _unusable("open the state database", self.path, e) from None
            return self._replace_corrupt(e)

    def _replace_corrupt(self, e: sqlite3.Error) -> sqlite3.Connection:
        aside = self.path.with_name(f"state.db.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
        except OSError as err:
            raise _unusable("move the corrupt state database aside:", self.path, err) from None
        log.error("STATE DATABASE %s IS CORRUPT (%s): moved aside to %s; starting a fresh one "
                  "(history and counters are lost; checkpoints are untouched)", self.path, e, aside)
        self.moved_aside = aside
        try:
            conn = self._connect()
            self._check(conn)
        except (OSError, sqlite3.Error) as err:
            raise _unusable("create a fresh state database", self.path, err) from None
        return conn

    moved_aside: Path | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._closing = True
            self._wake.set()
            self._writer.join()
            self._writer = None
        self.flush()
        self.conn.close()

    def start_writer(self) -> None:
        """Commit from now on in a thread of this db's own; `wake()` (called by
        `on_pending` at the end of a loop turn) hands it what was queued."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="trainsup-state", daemon=True)
            self._writer.start()

    def wake(self) -> None:
        if self._writer is None:
            self.flush()
        else:
            self._wake.set()

    def _write_loop(self) -> None:
        while not self._closing:
            self._wake.wait(_BUSY_RETRY_S if self._retry_busy else None)
            self._wake.clear()
            self._retry_busy = False
            self.flush()

    def _bound_held(self) -> int:
        """Under _qlock: drop the oldest event records past max_held; how many went."""
        over = len(self._pending) - self.max_held
        if over <= 0:
            return 0
        keep, dropped = [], 0
        for rec in self._pending:
            if dropped < over and rec[0].startswith(_EVENT_INSERT):
                dropped += 1
                continue
            keep.append(rec)
        self._pending = keep
        return dropped

    def _queue(self, sql: str, params: tuple) -> None:
        with self._qlock:
            self._pending.append((sql, params))
            first = len(self._pending) == 1
        if self.on_pending is None:
            self.flush()
        elif first:
            self.on_pending()

    def flush(self) -> None:
        """Commit queued writes in one transaction, in the calling thread. While another
        process holds the database they wait and the writer thread retries; on any other
        failure (ENOSPC...) they are dropped and the previous state stays intact;
        supervision goes on."""
        with self.lock:
            with self._qlock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                for sql, params in batch:
                    self.conn.execute(sql, params)
                self.conn.execute("COMMIT")
                if self._busy_since is not None:
                    log.warning("state: the database is writable again after %.1fs; %d records written",
                                time.monotonic() - self._busy_since, len(batch))
                    self._busy_since = None
            except sqlite3.Error as e:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if getattr(e, "sqlite_errorcode", None) in _BUSY and self._writer is not None:
                    # Another process holds the database (a backup, sqlite3 by hand): the
                    # records wait, in order, and the writer tries again. Held for long,
                    # the oldest history records go first (job rows are kept): the
                    # daemon's memory is bounded, its state is not lost.
                    if self._busy_since is None:
                        self._busy_since = time.monotonic()
                        log.warning("state: the database is locked by another process (%s); "
                                    "%d records wait and are retried", e, len(batch))
                    with self._qlock:
                        self._pending[:0] = batch
                        dropped = self._bound_held()
                    if dropped:
                        log.error("state: the database has been locked for %.0fs; %d oldest history "
                                  "records dropped (at most %d wait)", time.monotonic() - self._busy_since,
                                  dropped, self.max_held)
                    self._retry_busy = True
                    return
                log.error("state: cannot write %d records: %s (previous state kept)", len(batch), e)

    # -- jobs ---------------------------------------------------------------------
    def load_job(self, name: str) -> dict[str, Any]:
        with self.lock:
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
        self._queue(_EVENT_INSERT + "(job, at, kind, data) VALUES(?,?,?,?)", (job, at, kind, json.dumps(data)))
        self._since_trim += 1
        if self._since_trim >= 500:
            self._since_trim = 0
            self._queue("DELETE FROM events WHERE id <= (SELECT id FROM events WHERE job=? "
                        "ORDER BY id DESC LIMIT 1 OFFSET ?) AND job=?", (job, _MAX_EVENTS_PER_JOB, job))
        return ev

    _since_trim = 0

    def events(self, job: str, limit: int = 50) -> list[dict]:
        with self.lock:
            self.flush()
            rows = self.conn.execute("SELECT at, kind, data FROM events WHERE job=? ORDER BY id DESC LIMIT ?",
                                     (job, limit)).fetchall()
        out = []
        for at, kind, data in reversed(rows):
            try:
                d = json.loads(data)
            except ValueError:
                d = {}
            # The record's own time wins over any "at" in its data: history is in time
            # order (a notice's data once carried when it arrived, and printed out of order).
            out.append({**d, "at": at, "kind": kind})
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
