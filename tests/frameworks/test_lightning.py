"""Lightning with TrainsupCallback under a real daemon."""

from __future__ import annotations

import os
import re
import signal

from conftest import wait_for
from fw import bit_exact_after_preemptions, exits, job_log, need, resumed_lines, scenario, wait_steps, write_job

need("lightning")

STEP = re.compile(r"step=(\d+)\.ckpt$")


def pl_ckpts(d):
    return {p: int(m.group(1)) for p in d.glob("*.ckpt") if (m := STEP.search(p.name))}


def test_lightning_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "pl", "train_lightning.py", "--steps", "100000", "--every", "1000", "--sleep-per-step", "0.02")
    scenario(daemon, "pl", pl_ckpts)
    assert not list((daemon.root / "pl-ckpt").glob(".*.tmp.*")), "a temp file was left behind"


def test_lightning_sigterm_from_outside_saves_and_exits_143_so_the_job_restarts(daemon):
    """Regression (issue 13): Lightning exited 0 on an outside SIGTERM without saving; the
    job showed `finished` and was never restarted."""
    ckpt = write_job(daemon, "plterm", "train_lightning.py", "--steps", "100000", "--every", "1000",
                     "--sleep-per-step", "0.01")
    daemon.start()
    wait_steps(daemon, "plterm", 10)
    os.kill(daemon.status("plterm")["pid"], signal.SIGTERM)    # not through the daemon
    wait_for(lambda: resumed_lines(daemon, "plterm"), 120, f"a restart: {job_log(daemon, 'plterm')[-2000:]}")
    ex = exits(daemon, "plterm")[0]
    assert ex["code"] == 143, ex
    saved = list(pl_ckpts(ckpt))
    assert len(saved) == 1 and resumed_lines(daemon, "plterm")[0] == str(saved[0])
    daemon.cli("stop", "plterm", "--no-save")


def test_lightning_bit_exact_after_three_preemptions(daemon, tmp_path):
    bit_exact_after_preemptions(daemon, tmp_path, "plx", "train_lightning.py",
                                ["--steps", "80", "--every", "1000", "--sleep-per-step", "0.03"])
