"""The daemon SIGKILLed at each named crash point (supervisor/crashpoints.py), then started
again: the job never runs twice, the state is whole, a half-done deletion is finished, and
every checkpoint that vanished is accounted for by a `deleted` event."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _support import canaries_now, db_integrity, job_processes, plant_canaries
from conftest import wait_for

POINTS = ["state-write", "trash-rename", "delete", "spawn", "record"]
ROTATING = {"trash-rename", "delete"}


def _launch_attempts(d, job):
    return [e["attempt"] for e in d.history(job) if e["kind"] == "launch"]


@pytest.mark.parametrize("point", POINTS)
def test_crash_point_then_restart_loses_nothing(daemon, point):
    root: Path = daemon.root
    job = f"cp-{point}"
    ck = root / f"{job}-ckpt"
    before = plant_canaries(ck, root / "outside")
    # The rotating cases need deletions: checkpoints every few steps, keep_last 2.
    flags = "--catch-usr1 --save-every-steps 5" if point in ROTATING else "--catch-usr1"
    daemon.fakejob(job, flags, extra="  keep_last: 2\n  keep_best: 0\nstop_timeout: 2s\n")
    once = root / "crashed-once"
    env = {"TRAINSUP_CRASH_AT": point, "TRAINSUP_CRASH_ONCE": str(once)}
    daemon.start(wait=False, env=env)
    wait_for(lambda: daemon.proc.poll() is not None, 20, f"the daemon to crash at {point}")
    assert daemon.proc.returncode == -9 and once.exists()
    assert db_integrity(daemon.state) == "ok"
    daemon.start(env=env)                       # the once-file lets it run through now
    st = daemon.wait_state(job, "running", timeout=20)
    if point in ROTATING:
        wait_for(lambda: any(e["kind"] == "deleted" for e in daemon.history(job)), 20, "a rotation pass")
    # "Must not happen" over a settle window: never two live processes of the job.
    t0 = time.monotonic()
    seen = 0
    while time.monotonic() - t0 < 1.5:
        procs = job_processes(job, root)
        seen = max(seen, len(procs))
        assert len(procs) <= 1, f"job ran twice after a crash at {point}: {[p.pid for p in procs]}"
        time.sleep(0.05)
    assert seen == 1
    attempts = _launch_attempts(daemon, job)
    assert attempts == sorted(set(attempts)), f"attempt counter went back or repeated: {attempts}"
    assert st["attempt"] == attempts[-1]
    daemon.request("stop", job, no_save=True)
    # A deletion cut short is finished at start: the trash holds nothing.
    trash = ck / ".trainsup-trash"
    # (A rotation pass may still be removing its last entry: wait for it, bounded.)
    wait_for(lambda: not trash.exists() or list(trash.iterdir()) == [], 5, "the trash to be empty")
    # Every checkpoint the job saved and that is gone has a `deleted` event.
    saved = {r["path"] for r in daemon.records(job) if r["event"] == "saved"}
    vanished = {p for p in saved if not Path(p).exists()}
    deleted = {e["path"] for e in daemon.history(job, 5000) if e["kind"] == "deleted"}
    assert vanished <= deleted, f"deleted without a record after a crash at {point}: {sorted(vanished - deleted)}"
    assert canaries_now(ck, root / "outside") == before
