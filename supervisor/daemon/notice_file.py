"""Daemon side of the notice file: what a save request wants, written before the signal.

The job finds the file through TRAINSUP_NOTICE_FILE: `<heartbeat dir>/.notices/<job>/notice.json`,
beside the job's heartbeat (/run/trainsup/<tree>/ for a root daemon: every level reachable by
name, none listable), in a per-job dir owned by the job's user, mode 0700. It once sat in
the state dir (0750 root), where a `user:` job could not even reach it: one save per
preemption and `time_left()` silently did not exist for such jobs. A job's user writes its
acknowledgement next to the notice; no other user can read or write either. Never in the
checkpoint dir (it would be listed as an entry). The daemon creates its temp file there with
O_EXCL|O_NOFOLLOW: a link the user plants cannot make root write elsewhere. JSON: {"id",
"kind": "checkpoint"|"preempt", "deadline" (UTC epoch seconds or null), "deadline_iso",
"written"}. A job that understands it writes `<file>.ack` = {"id", "kind", "state":
"taken"|"saved", "exits"}: "exits" true means it ends by itself once that save is committed
(exit 0 after a preempt), so the stop flow waits for the exit instead of sending SIGTERM.
Jobs that never ack keep the old flow. The job side is trainsup.emergency.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..contract import ACK_SUFFIX, MAX_NOTICE_BYTES, NOTICE_NAME, notice_body, parse_ack

NOTICES_DIR = ".notices"     # no job name starts with a dot: never a job's heartbeat file


def prepare(heartbeat_dir: Path, job: str, owner: tuple[int, int] | None) -> Path:
    """The job's notice dir (created beside the heartbeats, owned by the job's user, 0700)
    and the notice file's path. Raises OSError."""
    top = Path(heartbeat_dir) / NOTICES_DIR
    try:
        os.mkdir(top, 0o711)
    except FileExistsError:
        pass
    _own(top, None, 0o711)           # the daemon's: reachable by name, not listable
    d = top / job
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    _own(d, owner, 0o700)
    return d / NOTICE_NAME


def _own(d: Path, owner: tuple[int, int] | None, mode: int) -> None:
    # not a job path: the daemon's notice dir
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)   # a planted link is refused
    try:
        st = os.fstat(fd)
        want = owner if owner is not None else (os.geteuid(), os.getegid())
        if (st.st_uid, st.st_gid) != want:
            os.fchown(fd, *want)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def path_of(state_dir: Path, job: str) -> Path:
    """The notice file's path (what `prepare` returns), without touching anything."""
    return Path(state_dir) / "notices" / job / NOTICE_NAME


def last_count(path: Path, attempt: int) -> int:
    """How many notices this attempt has had, from the id of the last one written
    (`<attempt>.<n>`); 0 when there is none. A daemon that takes a running job over
    numbers its notices on from there."""
    try:
        # not a job path: the daemon's notice file (O_NOFOLLOW|O_NONBLOCK)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            nid = json.loads(f.read(MAX_NOTICE_BYTES)).get("id")
        a, _, n = str(nid).partition(".")
        return int(n) if int(a) == attempt else 0
    except (OSError, ValueError, AttributeError):
        return 0


def clear(path: Path) -> None:
    """Before a launch: a new attempt must not read the last one's notice or ack."""
    for p in (path, Path(str(path) + ACK_SUFFIX)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass   # an unwritable dir is reported when the job saves; no notice then


def write(path: Path, notice_id: str, kind: str, deadline: float | None) -> bool:
    """Write the notice atomically (tmp + rename: the job never reads half of one). A few
    hundred bytes into the page cache, no fsync: only a live process reads it."""
    body = notice_body(notice_id, kind, deadline)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # not a job path: the daemon's notice file (O_EXCL)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def read_ack(path: Path, notice_id: str) -> dict | None:
    """The job's acknowledgement of notice `notice_id`, or None."""
    try:
        # not a job path: the ack beside the notice file (O_NONBLOCK|O_NOFOLLOW, checked regular)
        fd = os.open(str(path) + ACK_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_NOTICE_BYTES)
    except OSError:
        return None
    return parse_ack(raw, notice_id)
