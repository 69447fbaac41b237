"""Daemon side of the notice file: what a save request wants, written before the signal.

The job finds the file through TRAINSUP_NOTICE_FILE: `<state_dir>/notices/<job>/notice.json`,
in a per-job dir owned by the job's user (so a `user:` job can write its acknowledgement
next to it), never in the checkpoint dir (where it would be listed as an entry). The
daemon creates its temp file there with O_EXCL|O_NOFOLLOW: a link the user plants cannot
make root write elsewhere. JSON: {"id", "kind": "checkpoint"|"preempt", "deadline"
(UTC epoch seconds or null), "deadline_iso", "written"}. A job that understands it writes
`<file>.ack` = {"id", "kind", "state": "taken"|"saved", "exits"}: "exits" true means it
ends by itself once that save is committed (exit 0 after a preempt), so the stop flow
waits for the exit instead of sending SIGTERM. Jobs that never ack keep the old flow.
The job side is trainsup.emergency.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..contract import ACK_SUFFIX, MAX_NOTICE_BYTES, NOTICE_NAME, notice_body, parse_ack


def prepare(state_dir: Path, job: str, owner: tuple[int, int] | None) -> Path:
    """The job's notice dir (created, owned by the job's user) and the notice file's path.
    Raises OSError."""
    d = Path(state_dir) / "notices" / job
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        d.mkdir(mode=0o755)
    except FileExistsError:
        pass
    # not a job path: the daemon's notice dir
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)   # a planted link is refused
    try:
        st = os.fstat(fd)
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    return d / NOTICE_NAME


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
