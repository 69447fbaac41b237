"""Lightning with TrainsupCallback under a real daemon."""

from __future__ import annotations

import os
import re
import signal

from conftest import wait_for
from fw import (exits, job_log, last_step, need, resumed_lines, steps_logged,
                                 wait_steps, write_job)

need("lightning")

STEP = re.compile(r"step=(\d+)\.ckpt$")


def ckpts(d):
    return sorted((int(STEP.search(p.name).group(1)), p) for p in d.glob("*.ckpt") if STEP.search(p.name))


def test_lightning_checkpoint_wait_sigkill_resume_and_preempt(daemon):
    ckpt = write_job(daemon, "pl", "train_lightning.py", "--steps", "100000", "--every", "1000",
                     "--sleep-per-step", "0.01")
    daemon.start()
    wait_steps(daemon, "pl", 20)
    # checkpoint --wait returns once a new valid checkpoint is indexed
    r = daemon.cli("checkpoint", "pl", "--wait", "--timeout", "60s", timeout=90)
    assert r.returncode == 0, r.stderr
    saved = [p for s, p in ckpts(ckpt) if p.name.startswith("trainsup-")]
    assert len(saved) == 1 and str(saved[0]) in r.stdout, (r.stdout, list(ckpt.iterdir()))
    assert not list(ckpt.glob(".*")), "a temp file was left behind"

    # SIGKILL mid-run: the relaunch resumes through fit(ckpt_path=...) from the newest valid
    newest = max(ckpts(ckpt))[1]
    pid = daemon.status("pl")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: resumed_lines(daemon, "pl"), 120, "the relaunch to resume")
    assert resumed_lines(daemon, "pl")[-1] == str(newest)
    step_at_resume = int(STEP.search(newest.name).group(1))
    n0 = len(steps_logged(daemon, "pl"))
    wait_for(lambda: len(steps_logged(daemon, "pl")) > n0 + 5, 120, "steps after the resume")
    assert steps_logged(daemon, "pl")[n0] == step_at_resume + 1, "Lightning did not continue at the saved step"

    # preempt: one save, no step lost, the process exits by itself
    before = {p for _, p in ckpts(ckpt)}
    r = daemon.cli("preempt", "pl", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    st = daemon.wait_state("pl", "preempted", timeout=60)
    new = [p for _, p in ckpts(ckpt) if p not in before]
    assert len(new) == 1, f"expected exactly one save, got {new}"
    assert int(STEP.search(new[0].name).group(1)) == last_step(daemon, "pl"), "steps were lost"
    assert exits(daemon, "pl")[-1]["code"] == 0, exits(daemon, "pl")[-1]
    assert st["state"] == "preempted"

    # start: resumes with the same step through Lightning's own resume
    assert daemon.cli("start", "pl").returncode == 0
    wait_for(lambda: len(resumed_lines(daemon, "pl")) >= 2, 120, "the restart to resume")
    assert resumed_lines(daemon, "pl")[-1] == str(new[0])
    daemon.cli("stop", "pl", "--no-save")


def test_lightning_sigterm_from_outside_saves_and_exits_143_so_the_job_restarts(daemon):
    ckpt = write_job(daemon, "plterm", "train_lightning.py", "--steps", "100000", "--every", "1000",
                     "--sleep-per-step", "0.01")
    daemon.start()
    wait_steps(daemon, "plterm", 10)
    os.kill(daemon.status("plterm")["pid"], signal.SIGTERM)    # not through the daemon
    wait_for(lambda: resumed_lines(daemon, "plterm"), 120, f"a restart: {job_log(daemon, 'plterm')[-2000:]}")
    ex = exits(daemon, "plterm")[0]
    assert ex["code"] == 143, ex
    saved = [p for _, p in ckpts(ckpt)]
    assert len(saved) == 1 and resumed_lines(daemon, "plterm")[0] == str(saved[0])
    daemon.cli("stop", "plterm", "--no-save")
