"""The daemon⇄job contract, both ends of it: the TRAINSUP_* environment, the save signal,
the notice file and its acknowledgement, the heartbeat. The daemon writes what the job
reads and reads what the job writes through these names and functions only.

Imports nothing of trainsup and nothing outside the standard library (supervisord's
states.py rule): the training helper, the integrations and the daemon all read it, and a
job pays nothing for importing it.
"""

from __future__ import annotations

import datetime as _dt
import json
import signal
import time
from typing import Any

# -- the environment a job is launched with ------------------------------------------------
JOB = "TRAINSUP_JOB"                          # the job's name; set only under the daemon
CHECKPOINT_DIR = "TRAINSUP_CHECKPOINT_DIR"    # absolute; "" for a job without checkpoint:
RESUME_FROM = "TRAINSUP_RESUME_FROM"          # the latest valid checkpoint, or ""
ATTEMPT = "TRAINSUP_ATTEMPT"                  # 1, 2, ... across daemon restarts
RESTART_REASON = "TRAINSUP_RESTART_REASON"    # first | manual | crash | oom | hang | preempt
SAVE_SIGNAL = "TRAINSUP_SAVE_SIGNAL"          # a signal name, SIGUSR1 by default
HEARTBEAT_FILE = "TRAINSUP_HEARTBEAT_FILE"    # touch it (write the step) to show progress
NOTICE_FILE = "TRAINSUP_NOTICE_FILE"          # what the save signal asks for (below)
SOCKET = "TRAINSUP_SOCKET"                    # the daemon's control socket, for the CLI

DEFAULT_SAVE_SIGNAL = "SIGUSR1"


def signal_number(spec: str | int | None, default: int = signal.SIGUSR1) -> int:
    """A save signal by name (`SIGUSR1`, `usr1`) or number; `default` when unset.
    Raises ValueError for something that is neither."""
    if spec is None or spec == "":
        return default
    if isinstance(spec, int) or str(spec).isdigit():
        return int(spec)
    name = str(spec).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(getattr(signal, name))
    except AttributeError:
        raise ValueError(f"{SAVE_SIGNAL}={spec!r} is not a signal name") from None


# -- the notice: written by the daemon before it signals --------------------------------------
# `<heartbeat dir>/.notices/<job>/notice.json` (beside the heartbeat, where a `user:` job
# can reach it): {"id", "kind", "deadline" (UTC epoch seconds or
# null), "deadline_iso", "written"}. A job that reads it answers in `<notice>.ack`:
# {"id", "kind", "state": "taken" | "saved", "exits", "pid", "at", "path"}. "exits" true
# means the job ends by itself once that save is committed (exit 0 after a preempt), so
# the daemon waits for the exit instead of sending SIGTERM. Jobs that never ack get the
# plain flow: signal, then SIGTERM.
NOTICE_NAME = "notice.json"
ACK_SUFFIX = ".ack"
NOTICE_KINDS = ("checkpoint", "preempt")
MAX_NOTICE_BYTES = 64 * 1024                  # both files are a few hundred bytes


def iso_utc(t: float) -> str:
    """Wall time for people and logs: 2026-12-01T10:04:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def notice_body(notice_id: str, kind: str, deadline: float | None) -> dict[str, Any]:
    return {"id": notice_id, "kind": kind, "deadline": deadline,
            "deadline_iso": (_dt.datetime.fromtimestamp(deadline, _dt.timezone.utc).isoformat()
                             if deadline is not None else None),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat()}


def parse_notice(raw: bytes) -> tuple[str | None, str, float | None] | None:
    """(id, kind, deadline) of a notice, or None for one this end cannot read (then the
    signal alone means "checkpoint")."""
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("kind") not in NOTICE_KINDS:
        return None
    dl = d.get("deadline")
    deadline = float(dl) if isinstance(dl, (int, float)) and not isinstance(dl, bool) else None
    return (str(d["id"]) if d.get("id") is not None else None), d["kind"], deadline


def ack_body(notice_id: str, kind: str, state: str, exits: bool, pid: int, path: str | None) -> dict[str, Any]:
    return {"id": notice_id, "kind": kind, "state": state, "pid": pid, "at": time.time(),
            "path": path, "exits": exits}


def parse_ack(raw: bytes, notice_id: str) -> dict[str, Any] | None:
    """The acknowledgement of notice `notice_id`, or None."""
    try:
        ack = json.loads(raw)
    except ValueError:
        return None
    return ack if isinstance(ack, dict) and ack.get("id") == notice_id else None


# -- the heartbeat: its mtime is progress; its text, the step reached ------------------------
# The training helper rewrites it in place at every step (one pwrite at offset 0, about half a
# microsecond), so what the daemon reads when an attempt ends, even a SIGKILLed one, is the
# step it had reached: written once a second, the step read at exit trailed by up to a
# second of steps ("last_step=136" right after a save at step 187). Fixed width, padded with
# spaces: a shorter number never leaves digits of a longer one behind.
HEARTBEAT_READ = 64                           # bytes the daemon reads of it
HEARTBEAT_WIDTH = 24


def heartbeat_text(step: int) -> str:
    return f"{step}\n".ljust(HEARTBEAT_WIDTH)


def parse_heartbeat(raw: bytes) -> int | None:
    text = raw.strip()
    return int(text) if text.isdigit() else None
