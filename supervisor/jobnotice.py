"""Daemon side of the notice file: what a save request wants, written before the signal.

The job finds the file through TRAINSUP_NOTICE_FILE (a dot file in its checkpoint dir,
so a job running as another user can read it and write its acknowledgement next to it;
the index ignores dot names). JSON: {"id", "kind": "checkpoint"|"preempt", "deadline"
(UTC epoch seconds or null), "deadline_iso", "written"}. A job that understands it writes
`<file>.ack` = {"id", "kind", "state": "taken"|"saved", "exits"}: "exits" true means it
ends by itself once that save is committed (exit 0 after a preempt), so the stop flow
waits for the exit instead of sending SIGTERM. Jobs that never ack keep the old flow.
The job side is trainsup.emergency.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Optional

NOTICE_NAME = ".trainsup-notice.json"
ACK_SUFFIX = ".ack"


def path_for(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / NOTICE_NAME


def clear(path: Path) -> None:
    """Before a launch: a new attempt must not read the last one's notice or ack."""
    for p in (path, Path(str(path) + ACK_SUFFIX)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass   # an unwritable dir is reported when the job saves; no notice then


def write(path: Path, notice_id: str, kind: str, deadline: Optional[float]) -> bool:
    """Write the notice atomically (tmp + rename: the job never reads half of one). A few
    hundred bytes into the page cache, no fsync: only a live process reads it."""
    body = {"id": notice_id, "kind": kind, "deadline": deadline,
            "deadline_iso": (_dt.datetime.fromtimestamp(deadline, _dt.timezone.utc).isoformat()
                             if deadline is not None else None),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(body, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def read_ack(path: Path, notice_id: str) -> Optional[dict]:
    """The job's acknowledgement of notice `notice_id`, or None."""
    try:
        with open(str(path) + ACK_SUFFIX, "rb") as f:
            ack = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    return ack if isinstance(ack, dict) and ack.get("id") == notice_id else None
