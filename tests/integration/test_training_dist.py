"""The helper under torch.distributed for real: `torchrun --nproc-per-node 2` (gloo, CPU),
no daemon. A save signal that reaches only one rank still makes both save at the same
step (one commit); after a SIGKILL of one rank, a relaunch with TRAINSUP_RESUME_FROM ends
with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")

sys.path.insert(0, str(Path(__file__).parent))
from test_training import (  # noqa: E402
    JOBS, Job, assert_same_state, committed, job_env, jobs, manifest, tail, wait_for,  # noqa: F401
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone", "--monitor-interval", "0.2"]
ARGS = [str(JOBS / "train_mlp.py"), "--steps", "160", "--every", "0", "--log-every", "1",
        "--sleep-per-step", "0.004"]


def rank_pids(agent: Job) -> dict[int, int]:
    out = {}
    for p in psutil.Process(agent.proc.pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "LOCAL_RANK" in env and "train_mlp.py" in " ".join(p.cmdline()):
            out[int(env["LOCAL_RANK"])] = p.pid
    return out if len(out) == 2 else {}


def test_torchrun_one_rank_signalled_one_commit_and_kill_resume_bit_exact(tmp_path, jobs):
    ref = Job(TORCHRUN + ARGS + ["--final-out", str(tmp_path / "ref.pt")],
              job_env(tmp_path, tmp_path / "ref-ckpt", 1, None), tmp_path / "ref.log", tmp_path)
    jobs.append(ref)
    assert ref.wait(120) == 0, tail(ref.log)

    ckpt = tmp_path / "ckpt"
    j = Job(TORCHRUN + ARGS, job_env(tmp_path, ckpt, 1, None), tmp_path / "a1.log", tmp_path)
    jobs.append(j)
    pids = wait_for(lambda: rank_pids(j), what="two ranks", proc=j.proc, log=j.log)
    seen = j.wait_step(23)
    os.kill(pids[1], signal.SIGUSR1)  # only rank 1 hears it; rank 0 learns by agreement
    cp = wait_for(lambda: committed(ckpt), what="checkpoint", proc=j.proc, log=j.log)[0]
    m = manifest(cp)
    assert m["reason"] == "signal" and seen < m["step"] <= seen + 40, (seen, m)
    assert {"state.pt", "rank-00000.pt", "rank-00001.pt"} <= set(m["files"])
    # Must not happen: a second commit (each rank saving on its own). Settle 30 steps.
    j.wait_step(m["step"] + 30)
    assert len(committed(ckpt)) == 1

    os.kill(pids[0], signal.SIGKILL)
    rc = j.wait(60)      # torchrun tears the surviving rank down and reports failure
    assert rc != 0
    j.kill_all()

    r = Job(TORCHRUN + ARGS + ["--final-out", str(tmp_path / "final.pt")],
            job_env(tmp_path, ckpt, 2, cp), tmp_path / "a2.log", tmp_path)
    jobs.append(r)
    assert r.wait(120) == 0, tail(r.log)
    assert f"resumed from step {m['step']}" in r.log.read_text()
    assert_same_state(tmp_path / "ref.pt", tmp_path / "final.pt")
