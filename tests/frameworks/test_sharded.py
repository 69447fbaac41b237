"""The sharded formats large runs use, under a real daemon, through each library's own save
and resume calls, multi-process where the format is: a save killed mid-way is never
offered, the relaunch resumes through the library's call from the newest complete save,
rotation under a keep_last tighter than the library's own retention keeps the library's
bookkeeping working, and a preemption is one agreed save on every rank and exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, wait_for
from fw import SCRIPTS, job_log, last_step, need, resumed_lines, saves_logged, steps_since_resume

STARTUP = 240.0
# Periodic saves stop after this step, so the preemption's save is the only one in flight:
# a periodic save landing just after the request is confirmed as the request's save before
# the job took the notice, and the daemon then sends SIGTERM (see the report on issue 23).
LAST_PERIODIC = 40


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


def _preempt_then_start(daemon, name: str, complete, every: int = 4) -> None:
    """preempt: one save at the step every rank reached (a periodic save already on its way
    may land too), exit 0; start: resumes from it."""
    _wait(daemon, name, lambda: last_step(daemon, name) > LAST_PERIODIC + 2, f"{name} past its periodic saves")
    # checkpoint --wait: one save on every rank, confirmed, and the job goes on
    before = complete()
    r = daemon.cli("checkpoint", name, "--wait", "--timeout", "120s", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    new = {p: s for p, s in complete().items() if p not in before}
    assert len(new) == 1 and any(str(p) in r.stdout for p in new), (r.stdout, new)
    assert daemon.status(name)["state"] == "running"
    before = complete()
    r = daemon.cli("preempt", name, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state(name, "preempted", timeout=60)
    saved_step = last_step(daemon, name)
    new = {s: p for p, s in complete().items() if p not in before}
    assert saved_step in new, f"no save at the step reached ({saved_step}): {new}"
    assert all(s % every == 0 for s in new if s != saved_step), f"saves beyond the one asked for: {new}"
    assert saves_logged(daemon, name).count(saved_step) == 1, "the ranks saved more than once"
    saved_path = new[saved_step]
    assert _events(daemon, name, "exit")[-1]["code"] == 0, _events(daemon, name, "exit")[-1]
    assert _events(daemon, name, "notice")[-1].get("outcome") == "saved", _events(daemon, name, "notice")[-1]
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


def _torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(SCRIPTS / script), *args]


def _killed_rotated_preempted(daemon, name: str, ckpt: Path, complete, killed: str, resumed: str,
                              oldest: str, bookkeeping=lambda: None, own_pruning: bool = False) -> None:
    """The save killed inside the library's save (the 3rd, step 12) is moved aside, the
    relaunch resumes through the library's call from `resumed` (step 8) at step 9; then
    keep_last 2 rotates whole saves (bookkeeping() checked at every look), and preempt/start."""
    daemon.start()
    _wait(daemon, name, lambda: resumed_lines(daemon, name), f"{name} to resume after the kill")
    assert resumed_lines(daemon, name)[0] == str(ckpt / resumed), job_log(daemon, name)[-2000:]
    moved = _events(daemon, name, "moved-aside")
    assert [Path(e["path"]).name for e in moved] == [Path(killed).name], moved
    _wait(daemon, name, lambda: len(steps_since_resume(daemon, name)) > 2, f"{name} to train after the resume")
    assert steps_since_resume(daemon, name)[0] == 9, "the resumed run did not continue at step 9"

    seen: set[Path] = set()

    def rotated():
        bookkeeping()
        seen.update(complete())
        # the save at the killed one's step, written again after the resume, goes too (by
        # trainsup, or by the library's own pruning where it has one)
        return (len(seen) >= 5 and _events(daemon, name, "deleted")
                and not (ckpt / oldest).exists() and not (ckpt / killed).exists())

    _wait(daemon, name, rotated, f"{name}: 5 saves, {oldest} and the new {killed} rotated away")
    if not own_pruning:     # trainsup keeps it; a library's own pruning (total_limit) may not
        assert (ckpt / resumed).is_dir(), "the save this run resumed from was rotated away"
    # keep_last 2 + resumed-from + one being written, once the pass after the last save ran
    # (passes are >= 1 s apart; on a loaded machine two saves landed in between: CI)
    _wait(daemon, name, lambda: len(complete()) <= 4, f"{name}: rotation down to keep_last 2 + resumed-from")
    assert "Traceback" not in job_log(daemon, name).split("resuming from")[-1]
    bookkeeping()
    _preempt_then_start(daemon, name, complete)
    bookkeeping()


def test_dcp_fsdp_two_ranks_killed_before_commit_rotated_preempted(daemon):
    """async_save: rank 0 SIGKILLed in the storage writer's finish(), every shard written."""
    need("torch.distributed.checkpoint")
    ckpt = _job(daemon, "dcp", _torchrun("train_dcp.py", "--steps", "100000", "--every", "4", "--async", "--last-periodic", str(LAST_PERIODIC),
                                         "--kill-at-commit", "3", "--sleep-per-step", "0.05"))
    _killed_rotated_preempted(daemon, "dcp", ckpt, lambda: _dcp_complete(ckpt), "step_12", "step_8", "step_4")


# -------------------------------------------------------------------- DeepSpeed


def _ds_complete(d: Path) -> dict[Path, int]:
    """{global_stepN/: N} every rank finished: N no later than the tag `latest` names."""
    try:
        at = int((d / "latest").read_text().strip().removeprefix("global_step"))
    except (OSError, ValueError):
        return {}
    return {p: n for p in d.glob("global_step*") if (n := int(p.name.removeprefix("global_step"))) <= at}


def _ds_latest_loadable(d: Path) -> None:
    """`latest` (what load_checkpoint(save_dir) reads) names a save that is on disk, whole."""
    try:
        tag = (d / "latest").read_text().strip()
    except FileNotFoundError:
        return
    if tag:         # empty: DeepSpeed is rewriting it in place this instant
        assert (d / tag / "mp_rank_00_model_states.pt").is_file(), f"latest names {tag}, which is gone"
        assert (d / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file(), f"{tag} lost a rank's part"


def test_deepspeed_zero2_two_ranks_killed_in_save_rotated_preempted(daemon):
    """Rank 0 SIGKILLed inside save_checkpoint after its model states; `latest` stays valid."""
    need("deepspeed")
    if shutil.which("c++") is None:
        pytest.skip("DeepSpeed's CPU accelerator JIT-builds its shm comm op: no C++ compiler here")
    ckpt = _job(daemon, "ds", _torchrun("train_deepspeed.py", "--steps", "100000", "--every", "4", "--last-periodic", str(LAST_PERIODIC),
                                        "--kill-in-save", "3", "--sleep-per-step", "0.05"))
    _killed_rotated_preempted(daemon, "ds", ckpt, lambda: _ds_complete(ckpt), "global_step12", "global_step8",
                              "global_step4", bookkeeping=lambda: _ds_latest_loadable(ckpt))


# ------------------------------------------------------------------ Accelerate


def _acc_complete(d: Path) -> dict[Path, int]:
    """{checkpoints/checkpoint_N: training step} of saves with their registered step
    (custom_checkpoint_0.pkl: the last file save_state writes), read as load_state would."""
    import torch

    out = {}
    for p in (d / "checkpoints").glob("checkpoint_*"):
        try:
            out[p] = int(torch.load(p / "custom_checkpoint_0.pkl", weights_only=False)["step"])   # the test's own file
        except (OSError, RuntimeError, EOFError, KeyError):
            continue
    return out


def test_accelerate_two_processes_killed_in_save_state_rotated_under_total_limit_preempted(daemon):
    """keep_last 2 under Accelerate's own total_limit 3: both prune, save_state never trips
    over what trainsup did (a trash folder in checkpoints/, a gap in the numbers)."""
    need("accelerate")
    ckpt = _job(daemon, "acc", _torchrun("train_accelerate.py", "--steps", "100000", "--every", "4", "--last-periodic", str(LAST_PERIODIC),
                                         "--total-limit", "3", "--kill-in-save", "3", "--sleep-per-step", "0.05"))
    _killed_rotated_preempted(daemon, "acc", ckpt, lambda: _acc_complete(ckpt), "checkpoints/checkpoint_2",
                              "checkpoints/checkpoint_1", "checkpoints/checkpoint_0",
                              bookkeeping=lambda: _no_trainsup_names_in(ckpt / "checkpoints"), own_pruning=True)


def _no_trainsup_names_in(d: Path) -> None:
    if d.is_dir():
        assert all(n.startswith("checkpoint_") for n in os.listdir(d)), sorted(os.listdir(d))


# ------------------------------------------------------------------------ Orbax


def _orbax_complete(d: Path) -> dict[Path, int]:
    """{<step>/: step} Orbax committed (renamed into place, commit_success.txt inside)."""
    return {p: int(p.name) for p in d.glob("[0-9]*") if p.name.isdigit() and (p / "commit_success.txt").is_file()}


def test_orbax_async_save_killed_before_rename_rotated_under_max_to_keep_preempted(daemon):
    """JAX on CPU, one process (Orbax's multi-host commit needs jax.distributed): the async
    save killed in its finalize is moved aside, restore(step) resumes, keep_last 2 under
    Orbax's max_to_keep 3, and the preemption save is one save and exit 0."""
    need("orbax.checkpoint")
    ckpt = _job(daemon, "orbax", [sys.executable, str(SCRIPTS / "train_orbax.py"), "--steps", "100000",
                                  "--every", "4", "--last-periodic", str(LAST_PERIODIC), "--max-to-keep", "3",
                                  "--kill-at-commit", "3", "--sleep-per-step", "0.05"])
    _killed_rotated_preempted(daemon, "orbax", ckpt, lambda: _orbax_complete(ckpt), "12.orbax-checkpoint-tmp",
                              "8", "4", own_pruning=True)


def test_collective_save_on_sigterm_to_the_process_group_is_one_agreed_save(tmp_path):
    """SIGTERM (what stop sends, to the whole process group: torchrun and every rank) at
    any moment: the ranks agree on one step, all save it once, and it is complete."""
    import signal
    import subprocess
    import threading

    from trainsup.checkpoint.index import latest_valid, scan

    need("torch.distributed.checkpoint")
    ckpt = tmp_path / "ck"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRAINSUP_CHECKPOINT_DIR=str(ckpt))
    p = subprocess.Popen(_torchrun("train_dcp.py", "--steps", "100000", "--every", "1000", "--sleep-per-step", "0.05"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: "step 20\n" in lines, STARTUP, "the ranks to reach step 20")
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    reader.join(10)
    saves = [int(x.split()[-1]) for x in lines if x.startswith("saving step ")]
    assert len(saves) == 1 and saves[0] >= 20, "".join(lines)[-3000:]
    infos = scan(ckpt)
    assert latest_valid(infos).name == f"step_{saves[0]}", infos
    # no rank failed (torchrun prefixes a rank's traceback with [rankN]; its own
    # SignalException on SIGTERM is the launcher's, and makes the daemon restart the job)
    assert not [x for x in lines if x.startswith("[rank")], "".join(lines)[-3000:]
