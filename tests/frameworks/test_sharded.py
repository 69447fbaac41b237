"""The sharded formats large runs use, under a real daemon, through each library's own save
and resume calls, multi-process where the format is: a save killed mid-way is never
offered, the relaunch resumes through the library's call from the newest complete save,
rotation under a keep_last tighter than the library's own retention keeps the library's
bookkeeping working, and a preemption is one agreed save on every rank and exit 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import REPO, wait_for
from fw import SCRIPTS, job_log, last_step, need, resumed_lines, saves_logged, steps_since_resume

STARTUP = 240.0


def _job(daemon, name: str, cmd: list[str], keep_last: int = 2) -> Path:
    ckpt = daemon.root / f"{name}-ckpt"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    daemon.write_job(name, f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
                           f"env: {json.dumps(env)}\nstop_timeout: 60s\n"
                           f"checkpoint:\n  dir: {ckpt}\n  keep_last: {keep_last}\n  keep_best: 0\n"
                           f"emergency_save:\n  grace: 120s\n"
                           f"restart:\n  backoff: {{initial: 0}}\n  max_restarts_without_progress: 20\n")
    return ckpt


def _wait(daemon, name: str, pred, what: str, timeout: float = STARTUP):
    try:
        return wait_for(pred, timeout, what, interval=0.05)
    except AssertionError as e:
        ckpt = daemon.root / f"{name}-ckpt"
        listing = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) if ckpt.exists() else []
        raise AssertionError(f"{e}\nstatus: {daemon.status(name)}\ndir: {listing}\n"
                             f"checkpoints: {daemon.cli('checkpoints', name).stdout}\n"
                             f"history: {daemon.history(name)[-10:]}\nlog tail: {job_log(daemon, name)[-2500:]}") from None


def _events(daemon, name: str, kind: str) -> list[dict]:
    return [e for e in daemon.history(name) if e["kind"] == kind]


def _preempt_then_start(daemon, name: str, complete) -> None:
    """preempt: one new complete save at the step reached, exit 0; start: resumes from it."""
    before = complete()
    n_saves = len(saves_logged(daemon, name))
    r = daemon.cli("preempt", name, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state(name, "preempted", timeout=60)
    new = {p: s for p, s in complete().items() if p not in before}
    assert len(new) == 1, f"expected exactly one new save, got {new}"
    assert len(saves_logged(daemon, name)) == n_saves + 1, "the ranks saved more than once"
    (saved_path, saved_step), = new.items()
    assert saved_step == last_step(daemon, name), f"steps lost: saved {saved_step}, reached {last_step(daemon, name)}"
    assert _events(daemon, name, "exit")[-1]["code"] == 0, _events(daemon, name, "exit")[-1]
    n = len(resumed_lines(daemon, name))
    assert daemon.cli("start", name).returncode == 0
    _wait(daemon, name, lambda: len(resumed_lines(daemon, name)) > n, f"{name} to resume after start")
    assert resumed_lines(daemon, name)[-1] == str(saved_path)
    _wait(daemon, name, lambda: steps_since_resume(daemon, name), f"{name} to train after start")
    assert steps_since_resume(daemon, name)[0] == saved_step + 1
    daemon.cli("stop", name, "--no-save")


# ------------------------------------------------------------------ PyTorch DCP


def _dcp_complete(d: Path) -> dict[Path, int]:
    """{step_N/: N} whose `.metadata` exists: what dcp.load can read (DCP renames it in last)."""
    return {p: int(p.name.split("_")[1]) for p in d.glob("step_*") if (p / ".metadata").is_file()}


def test_dcp_fsdp_two_ranks_killed_before_commit_rotated_preempted(daemon):
    need("torch.distributed.checkpoint")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPTS / "train_dcp.py"), "--steps", "100000", "--every", "4", "--async",
           "--kill-at-commit", "3", "--sleep-per-step", "0.05"]
    ckpt = _job(daemon, "dcp", cmd)
    daemon.start()
    # the 3rd save (step 12, async) loses rank 0 after its shards, before `.metadata`
    _wait(daemon, "dcp", lambda: resumed_lines(daemon, "dcp"), "dcp to resume after the kill")
    assert resumed_lines(daemon, "dcp")[0] == str(ckpt / "step_8"), job_log(daemon, "dcp")[-2000:]
    moved = [e for e in _events(daemon, "dcp", "moved-aside")]
    assert [Path(e["path"]).name for e in moved] == ["step_12"], moved
    assert "missing .metadata" in moved[0]["why"], moved
    _wait(daemon, "dcp", lambda: len(steps_since_resume(daemon, "dcp")) > 2, "dcp to train after the resume")
    assert steps_since_resume(daemon, "dcp")[0] == 9, "the resumed run did not continue at step 9"

    # rotation (keep_last 2; DCP keeps everything itself): whole folders go, the rest load
    seen: set[Path] = set()

    def rotated():
        seen.update(_dcp_complete(ckpt))
        return len(seen) >= 5 and (ckpt / "step_4").exists() is False and _events(daemon, "dcp", "deleted")

    _wait(daemon, "dcp", rotated, "dcp: 5 saves and step_4 rotated away")
    deleted = {Path(e["path"]).name for e in _events(daemon, "dcp", "deleted")}
    assert {"step_4", "step_12"} <= deleted, deleted
    assert (ckpt / "step_8" / ".metadata").is_file(), "the save this run resumed from was rotated away"
    assert len(_dcp_complete(ckpt)) <= 4, sorted(_dcp_complete(ckpt))     # keep_last 2 + resumed-from + a new one
    assert "Traceback" not in job_log(daemon, "dcp").split("resuming from")[-1]
    _preempt_then_start(daemon, "dcp", lambda: _dcp_complete(ckpt))
