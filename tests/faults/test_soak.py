"""Random SIGKILLs of a training job: every resume comes from a valid checkpoint, nothing
loads corrupt, and no kill loses more than one save interval of steps.

The job is tests/helpers/fakejob.py saving every SAVE_EVERY steps through the real
checkpoint writer; it verifies the checkpoint it resumed from against its manifest. A kill
is SIGSTOP, read the last completed step, SIGKILL: the step at the kill is then exact.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from conftest import wait_for

SAVE_EVERY = 20


def _soak(daemon, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    job = "soak"
    progress = daemon.root / "soak.progress"
    daemon.fakejob(job, f"--save-every-steps {SAVE_EVERY} --progress {progress}",
                   extra="  keep_last: 3\n  keep_best: 0\n"
                         "restart:\n  max_restarts: 100000\n  max_restarts_without_progress: 100000\n"
                         "  backoff: {initial: 0}\n  start_limit_interval: 0s\nstop_timeout: 2s\n")
    daemon.start()
    lost, kill_steps = [], []
    for k in range(kills):
        start = daemon.wait_ready(job, k + 1, timeout=30)
        # Land anywhere: before the first save of this attempt, mid-save, between saves.
        t_end = time.monotonic() + rng.uniform(0.02, 0.5)
        wait_for(lambda: time.monotonic() >= t_end, 2, "a random moment")
        pid = start["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            step_at_kill = int(progress.read_bytes() or b"0")
        finally:
            os.kill(pid, signal.SIGKILL)
        kill_steps.append(step_at_kill)
    starts = daemon.wait_ready(job, kills + 1, timeout=30) and \
        [r for r in daemon.records(job) if r["event"] == "start"]
    resumes = starts[1:kills + 1]
    saves = [r for r in daemon.records(job) if r["event"] == "saved"]
    for step_at_kill, r in zip(kill_steps, resumes):
        if not r["resume"]:
            assert not [s for s in saves if s["t"] < r["t"]], f"a checkpoint existed but {r} did not resume"
        else:
            assert r["resume_ok"] is True, f"corrupt load: {r['resume']}"
        lost.append(step_at_kill - r["resumed_step"])
    # -1: killed after a save committed and before the job noted that step as done.
    bad = [(i + 1, kill_steps[i], r["resume"], max((s["step"] for s in saves if s["t"] < r["t"]), default=None))
           for i, (n, r) in enumerate(zip(lost, resumes)) if not -1 <= n <= SAVE_EVERY]
    assert not bad, f"(kill#, step at kill, resumed from, newest saved before relaunch): {bad}"
    daemon.request("stop", job, no_save=True)
    return {"kills": kills, "max_lost": max(lost), "mean_lost": sum(lost) / len(lost),
            "resumed": sum(1 for r in resumes if r["resume"]),
            "corrupt": sum(1 for r in resumes if r["resume"] and r["resume_ok"] is not True)}


def test_ten_random_kills_resume_from_valid_checkpoints(daemon, record_property):
    out = _soak(daemon, 10, seed=7)
    record_property("soak", out)
    print("soak:", out)


@pytest.mark.slow
def test_two_hundred_random_kills(daemon, record_property):
    out = _soak(daemon, 200, seed=2026)
    record_property("soak", out)
    print("soak:", out)
