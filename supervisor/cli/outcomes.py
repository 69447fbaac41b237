"""What the action verbs say and exit with: one wording per outcome, one exit code per
outcome (README "Exit codes"), and the one JSON shape of each (`schema` JSON_SCHEMA).

Pure functions of the daemon's replies, so the table in the README, the words and the
codes are tested here and verb by verb against a real daemon (test_cli_conventions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The version of every `--json` shape. Bumped when a key is removed or changes meaning;
# keys may be added without a bump.
JSON_SCHEMA = 1

# One convention for every verb; systemctl's (LSB's) where it has one.
EXIT_OK = 0            # done, or the wanted state already held ("already running")
EXIT_FAIL = 1          # refused or failed; a stop whose save was not confirmed; `pid` of a job not running
EXIT_USAGE = 2         # bad command line; `daemon`: bad config, state dir in use, metrics port taken
EXIT_NOT_ACTIVE = 3    # `status`: a job needs a person (systemctl status: "not active")
EXIT_UNKNOWN = 4       # no such job, or the daemon cannot be reached (systemctl: "no such unit")

# Job states a named `status` counts as active (systemctl is-active: only "active" is 0).
ACTIVE_STATES = frozenset({"running", "saving"})


@dataclass
class Outcome:
    """One job's result of one action verb: the line a person reads, the exit code, and the
    object `--json` prints (the same keys whatever happened; null when they do not apply)."""
    job: str
    ok: bool
    outcome: str                  # started | already-running | stopped | preempted | restarted |
    #                               already-stopped | save-requested | saved | failed | not-running
    state: str | None = None
    pid: int | None = None
    saved: bool | None = None     # a save was asked for and confirmed (None: none asked for)
    step: int | None = None
    save_s: float | None = None
    stop_s: float | None = None
    detail: str | None = None     # why, when it did not go as asked
    line: str = ""
    warning: str | None = None    # a second line, on stderr (what a stop without a save cost)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("line")
        d.pop("warning")
        d["error"] = None if self.ok else self.detail
        return d

    @property
    def code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAIL


def _saved_at(res: dict) -> str:
    what = f"at step {res['step']}" if res.get("step") is not None else "a checkpoint"
    took = f" in {res['save_s']}s" if res.get("save_s") is not None else ""
    return f"saved {what}{took}"


def stop_outcome(name: str, res: dict, *, verb: str, no_save: bool, has_checkpoint: bool) -> Outcome:
    """stop, preempt, restart: the job is stopped (then started, for restart); was a save
    asked for, and confirmed? A stop that asked for a save and got none exits 1."""
    done = {"stop": "stopped", "preempt": "preempted", "restart": "restarted"}[verb]
    if res.get("already"):
        state = str(res.get("state"))
        return Outcome(name, True, "already-stopped", state=state, line=f"{name}: already {state}")
    if res.get("outcome") == "not running":
        return Outcome(name, True, "already-stopped", state=res.get("state"), line=f"{name}: was not running")
    if no_save:
        return Outcome(name, True, done, saved=None, stop_s=res.get("stop_s"), state=res.get("state"),
                       pid=res.get("pid"), line=f"{name}: {done} without a save (--no-save)")
    if res.get("outcome") == "saved":
        return Outcome(name, True, done, saved=True, step=res.get("step"), save_s=res.get("save_s"),
                       stop_s=res.get("stop_s"), state=res.get("state"), pid=res.get("pid"),
                       line=f"{name}: {done}, {_saved_at(res)}")
    why = res.get("outcome") or ("the job has no checkpoint section, so no save can be confirmed (--no-save)"
                                 if not has_checkpoint else "no save was confirmed")
    return Outcome(name, False, done, saved=False, stop_s=res.get("stop_s"), state=res.get("state"),
                   pid=res.get("pid"), detail=why,
                   line=f"{name}: {done}, no save confirmed: {why}",
                   warning=(f"{name}: {res['lost']}" if res.get("lost") else None))


def start_outcome(name: str, res: dict) -> Outcome:
    """start: where the launch got to (running, or why not)."""
    pid = res.get("pid")
    state = str(res.get("state"))
    if res.get("already"):
        return Outcome(name, True, "already-running", state=state, pid=pid,
                       line=f"{name}: already {state}" + (f" (pid {pid})" if pid else ""))
    if state in ("running", "saving") or state == "finished":
        return Outcome(name, True, "started", state=state, pid=pid,
                       line=f"{name}: started" + (f" (pid {pid})" if pid else f", {state}"))
    if state in ("starting", "pending"):
        return Outcome(name, True, "started", state=state, pid=pid, line=f"{name}: started, still {state}")
    why = res.get("error") or f"state {state}"
    return Outcome(name, False, "failed", state=state, pid=pid, detail=why, line=f"{name}: failed to start: {why}")


def checkpoint_outcome(name: str, res: dict, *, wait: bool) -> Outcome:
    if wait:
        what = f"at step {res['step']}" if res.get("step") is not None else str(res.get("path", "")).rstrip("/").rsplit("/", 1)[-1]
        return Outcome(name, True, "saved", saved=True, step=res.get("step"),
                       line=f"{name}: checkpoint {what} is valid: {res.get('path')}")
    pids = ", ".join(map(str, res.get("signalled") or ()))
    return Outcome(name, True, "save-requested", line=f"{name}: save signal sent to pid {pids}")


def failed(name: str, error: str) -> Outcome:
    return Outcome(name, False, "failed", detail=error, line=f"trainsup: {error}")
