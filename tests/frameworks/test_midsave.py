"""Issue 12: each framework's typical script, under a real daemon, SIGKILLed *inside* a save.

Saves are made slow with a large extra state (a `pad` buffer/variable saved with the model,
as an EMA copy or an embedding table would be), so a save takes long enough to be caught.
The test polls the checkpoint dir for the save's first bytes, SIGSTOPs the job, checks the
save is still incomplete (else lets it go on and waits for the next one), then SIGKILLs it:
no byte is written between the check and the kill.

What a user checks afterwards: the job is relaunched, resumes through the framework's own
resume call from the newest *complete* save (never the partial one), `trainsup checkpoints
--json` shows the partial save as invalid (or moved aside into .trainsup-aside/) with a
reason, and training and saving go on.

Two kinds of partial save:
- written in place, under a checkpoint name: HF's `checkpoint-N/` (trainer_state.json is
  written last), TF's `ckpt-N_temp/` + shard, Lightning's `epoch=E-step=S.ckpt` when its
  fsspec transaction moves the temp file across filesystems (TMPDIR on a tmpfs, as in
  containers: the move is a copy into the final name);
- a dot-named temp file, for the writers that commit by rename (trainsup's atomic_save for
  plain torch, save_model for Paddle, TrainsupBackup for Keras): the partial must never be
  offered as a checkpoint and the rename never happened.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, wait_for
from fw import SCRIPTS, job_log, need, resumed_lines, steps_since_resume, write_job
from fw_formats import hf_complete, keras_backup_complete, paddle_resume_point, paddle_step, tf_ckpts

ASIDE = ".trainsup-aside"


def _dot_temp(pattern: str) -> Callable[[Path], Path | None]:
    """A rename-committed save in progress: its (big) dot-named temp file exists."""
    def partial(d: Path) -> Path | None:
        found = sorted(p for p in d.glob(pattern) if p.is_file())
        return found[0] if found else None
    return partial


# -------------------------------------------------------- complete saves, per framework

def _plain_complete(d: Path) -> dict[Path, int]:
    import torch

    p = d / "last.pt"
    try:
        return {p: int(torch.load(p, weights_only=True, mmap=True)["step"])}
    except Exception:
        return {}


def _hf_partial(d: Path) -> Path | None:
    done = hf_complete(d)
    found = [p for p in d.glob("checkpoint-*") if p.is_dir() and p not in done and any(p.iterdir())]
    return found[0] if found else None


def _zip_complete(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            z.namelist()
        return True
    except (OSError, zipfile.BadZipFile):
        return False


_PL = re.compile(r"step=(\d+)\.ckpt$")


def _pl_complete(d: Path) -> dict[Path, int]:
    return {p: int(m.group(1)) for p in d.glob("*.ckpt") if (m := _PL.search(p.name)) and _zip_complete(p)}


def _pl_partial(d: Path) -> Path | None:
    found = [p for p in d.glob("*.ckpt") if _PL.search(p.name) and not _zip_complete(p)]
    return found[0] if found else None


def _paddle_complete(d: Path) -> dict[Path, int]:
    if paddle_step(d / "latest") is None:
        return {}
    p, s = paddle_resume_point(d)
    return {p: s}


def _tf_partial(d: Path) -> Path | None:
    found = sorted(d.glob("ckpt-*_temp"))
    return found[0] if found else None


# ------------------------------------------------------------------------ the cases

@dataclass
class Case:
    id: str
    module: str                                   # the framework (skip when not importable)
    script: Callable[[Path], Path]                # tmp_path -> the script to run
    args: tuple[str, ...]
    complete: Callable[[Path], dict[Path, int]]   # {what the resume call takes: step}
    partial: Callable[[Path], Path | None]        # a save that started and is not complete
    in_place: bool                                # the partial has a checkpoint name
    env: dict = field(default_factory=dict)


def _as_is(name: str) -> Callable[[Path], Path]:
    return lambda tmp: SCRIPTS / name


def _variant(name: str, old: str, new: str) -> Callable[[Path], Path]:
    """The script with one line changed (to carry a big extra state)."""
    def make(tmp: Path) -> Path:
        text = (SCRIPTS / name).read_text()
        assert old in text, f"{name} no longer has {old!r}"
        out = tmp / name
        out.write_text(text.replace(old, new))
        return out
    return make


CASES = [
    Case("plain", "torch", lambda tmp: REPO / "jobs" / "train_plain_trainsup.py",
         ("--steps", "1000000", "--every", "5", "--pad-mb", "64", "--sleep-per-step", "0.01"),
         _plain_complete, _dot_temp(".last.pt.tmp.*"), in_place=False),
    Case("hf", "transformers",
         # a 256k-position table: model.safetensors 32 MB, optimizer.pt 64 MB per save
         _variant("train_hf.py", "n_positions=16,", "n_positions=1 << 18,"),
         ("--steps", "100000", "--every", "4", "--sleep-per-step", "0.01"),
         hf_complete, _hf_partial, in_place=True),
    Case("lightning", "lightning", _as_is("train_lightning.py"),
         ("--steps", "100000", "--every", "4", "--pad-mb", "128", "--sleep-per-step", "0.01"),
         _pl_complete, _pl_partial, in_place=True, env={"TMPDIR": "/dev/shm"}),
    Case("paddle", "paddle", _as_is("train_paddleocr.py"),
         ("--batches", "4", "--pad-mb", "48", "--sleep-per-step", "0.01"),
         _paddle_complete, _dot_temp(".*.pdparams.tmp.*"), in_place=False),
    Case("tf", "tensorflow", _as_is("train_tf.py"),
         ("--every", "5", "--pad-mb", "64", "--sleep-per-step", "0.01"),
         tf_ckpts, _tf_partial, in_place=True),
    Case("keras", "keras",
         _variant("train_keras.py", '    model.compile(',
                  '    model.pad = model.add_weight(shape=(32 << 18,), initializer="zeros", trainable=False)\n'
                  '    model.compile('),
         ("--sleep-per-step", "0.01"),
         keras_backup_complete, _dot_temp(".latest.tmp.*.weights.h5"), in_place=False, env={"KERAS_BACKEND": "tensorflow"}),
]


def _kill_inside_a_save(pid: int, ckpt: Path, case: Case, timeout: float = 60.0) -> tuple[Path, dict[Path, int]]:
    """SIGKILL the job while a save is incomplete. Returns the partial save and the complete
    ones at the moment of the kill."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = wait_for(lambda: case.partial(ckpt), end - time.monotonic(), f"{case.id}: a save in progress",
                     interval=0.002)
        os.kill(pid, signal.SIGSTOP)
        if case.partial(ckpt) == p:          # stopped inside that save: nothing more gets written
            committed = case.complete(ckpt)
            os.kill(pid, signal.SIGKILL)
            return p, committed
        os.kill(pid, signal.SIGCONT)         # it finished between the two looks: take the next save
    raise AssertionError(f"{case.id}: no save caught in progress within {timeout} s")


def _rows_for(rows: list[dict], partial: Path) -> list[dict]:
    """The listing's rows for the partial save: its entry (a member of it), or what was moved aside."""
    out = []
    for r in rows:
        p, members = Path(r["path"]), {Path(m).name for m in r.get("members") or []}
        if p == partial or partial.name in members or p.parent.name == ASIDE and p.name.startswith(partial.name):
            out.append(r)
    return out


def _start(daemon, tmp_path: Path, case: Case, name: str, backoff: str) -> Path:
    """The case's job (fw.write_job's) with restart.backoff.initial = `backoff`; returns its dir."""
    ckpt = write_job(daemon, name, str(case.script(tmp_path)), *case.args, env=case.env)
    job = daemon.jobs / f"{name}.yaml"
    text = job.read_text()
    assert "backoff: {initial: 0}" in text
    job.write_text(text.replace("backoff: {initial: 0}", f"backoff: {{initial: {backoff}}}"))
    daemon.start()
    wait_for(lambda: case.complete(ckpt), 120, f"{name}: a first complete save", interval=0.1)
    return ckpt


def _relaunched(daemon, name: str, n_resumes: int) -> tuple[list[dict], list[dict]]:
    """Wait for the relaunch's "resuming from" line (more than `n_resumes`, counted before
    the kill: with backoff 0 the relaunch may resume before the test gets here); the
    listing and history read at once (the relaunched job will write a save of the same
    name again)."""
    wait_for(lambda: len(resumed_lines(daemon, name)) > n_resumes, 120, f"{name} to resume after the kill",
             detail=lambda: f"status: {daemon.status(name)}\nhistory: {daemon.history(name)[-6:]}\n"
                            f"log tail: {job_log(daemon, name)[-1500:]}")
    return json.loads(daemon.cli("checkpoints", name, "--json").stdout)["checkpoints"], daemon.history(name)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_killed_mid_save_resumes_from_the_newest_complete_save(daemon, tmp_path, case):
    need(case.module)        # find_spec only: paddle imported after TF in one process segfaults
    tmpdir = case.env.get("TMPDIR")
    if tmpdir and (not os.path.isdir(tmpdir) or os.stat(tmpdir).st_dev == os.stat(daemon.root).st_dev):
        pytest.skip(f"{tmpdir} is not another filesystem here: Lightning's move is a rename, no partial file")
    name = f"mid{case.id}"
    ckpt = _start(daemon, tmp_path, case, name, "1s")      # the default backoff

    n_resumes = len(resumed_lines(daemon, name))
    partial, committed = _kill_inside_a_save(daemon.status(name)["pid"], ckpt, case)
    assert committed, f"nothing complete when the kill landed: {sorted(os.listdir(ckpt))}"
    newest, step = max(committed.items(), key=lambda kv: kv[1])
    rows, history = _relaunched(daemon, name, n_resumes)

    # the framework's own resume call was handed the newest complete save, never the partial one
    launches = [e for e in history if e["kind"] == "launch"]
    assert launches[-1]["resume_from"] == str(newest), (launches[-1], partial)
    assert resumed_lines(daemon, name)[-1] == str(newest)
    wait_for(lambda: len(steps_since_resume(daemon, name)) > 2, 120, f"{name} to train after the resume")
    assert steps_since_resume(daemon, name)[0] == step + 1, "the relaunch did not continue at the saved step"

    # the partial save: moved aside before the relaunch and listed there with why; never valid
    mine = _rows_for(rows, partial)
    assert not [r for r in mine if r["valid"]], f"the partial save {partial} is listed as valid: {mine}"
    moved = [e for e in history if e["kind"] == "moved-aside"]
    if case.in_place:
        entry = partial.with_name(partial.name.removesuffix("_temp"))     # TF: ckpt-N_temp/ is part of ckpt-N
        assert [e for e in moved if Path(e["path"]) == entry and e["why"]], f"{entry} was not moved aside: {moved}"
        aside = [r for r in mine if Path(r["path"]).parent.name == ASIDE]
        assert aside and all(r["invalid_reason"] for r in aside), f"not listed in {ASIDE}/: {rows}"
    else:   # a rename-committed writer leaves nothing with a checkpoint name to move
        assert not moved, f"moved aside although every checkpoint-named entry was complete: {moved}"

    # training and saving go on
    wait_for(lambda: max(case.complete(ckpt).values(), default=0) > step, 120, f"{name}: a new save after the resume",
             interval=0.1)
    st = daemon.status(name)
    assert st["state"] == "running", st
    assert [e["reason"] for e in daemon.history(name) if e["kind"] == "exit"] == ["signal SIGKILL"]
    assert "Traceback" not in job_log(daemon, name), job_log(daemon, name)[-3000:]
    daemon.cli("stop", name, "--no-save")


def test_killed_mid_save_is_moved_aside_even_with_restart_backoff_0(daemon, tmp_path):
    """Issue 12 item 3 holds whatever the backoff: before the next launch, with no writer left,
    a half-written save newer than the newest valid one goes aside. Found here: with backoff 0
    the immediate relaunch skipped the move, and HF's get_last_checkpoint picked the
    half-written checkpoint-N/."""
    need("transformers")
    from transformers.trainer_utils import get_last_checkpoint

    (case,) = [c for c in CASES if c.id == "hf"]
    ckpt = _start(daemon, tmp_path, case, "midhf0", "0")
    n_resumes = len(resumed_lines(daemon, "midhf0"))
    partial, committed = _kill_inside_a_save(daemon.status("midhf0")["pid"], ckpt, case)
    rows, history = _relaunched(daemon, "midhf0", n_resumes)
    last = get_last_checkpoint(str(ckpt))      # what HF's own resume_from_checkpoint=True takes
    daemon.cli("stop", "midhf0", "--no-save")
    assert last != str(partial), f"HF's get_last_checkpoint picks the half-written {partial}"
    assert [e for e in history if e["kind"] == "moved-aside"], f"{partial} was not moved aside: {_rows_for(rows, partial)}"
