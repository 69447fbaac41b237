"""Keras 3 (TensorFlow backend) with TrainsupBackup, and with Keras' own BackupAndRestore,
under a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

from conftest import wait_for
from fw import SCRIPTS, job_log, last_step, need, need_daemon_format, resumed_lines, scenario, wait_steps, write_job
from fw_formats import keras_backup_complete

need("keras")
need("tensorflow")
need_daemon_format("keras")

KERAS_ENV = {"KERAS_BACKEND": "tensorflow"}


def test_keras_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "keras", "train_keras.py", "--sleep-per-step", "0.02", env=KERAS_ENV)
    scenario(daemon, "keras", keras_backup_complete, startup=240)


def test_keras_save_in_the_middle_of_an_epoch_is_confirmed_at_its_step(daemon, tmp_path):
    """Found with every Keras job after its first epoch: the backup's step was read from the
    metadata's `epoch`, so a save in the middle of an epoch never had a higher step than the
    last one: `preempt` said "exited before a new checkpoint" and `checkpoint --wait` waited
    for the epoch's end and reported the epoch as the step. An epoch of 256 batches here."""
    script = tmp_path / "train_keras.py"
    text = (SCRIPTS / "train_keras.py").read_text()
    assert "batch_size=16" in text
    script.write_text(text.replace("batch_size=16", "batch_size=1"))
    ckpt = write_job(daemon, "kmid", str(script), "--sleep-per-step", "0.005", env=KERAS_ENV)
    daemon.start()
    wait_steps(daemon, "kmid", 256 + 10, timeout=240)        # past the first epoch's save

    def meta() -> dict:
        return json.loads((ckpt / "training_metadata.json").read_text())

    r = daemon.cli("checkpoint", "kmid", "--wait", "--timeout", "60s", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    m = meta()
    assert m["batch"] not in (0, 256), f"the save waited for an epoch's end: {m}"
    assert f"step {m['step']}" in r.stdout, (r.stdout, m)

    wait_steps(daemon, "kmid", m["step"] + 5)
    r = daemon.cli("preempt", "kmid", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state("kmid", "preempted", timeout=60)
    m = meta()
    assert f"saved at step {m['step']}" in r.stdout, (r.stdout, m)
    assert m["step"] == last_step(daemon, "kmid"), (m, last_step(daemon, "kmid"))


def _h5_being_written(p: Path) -> bool:
    from trainsup.checkpoint.formats.common import Invalid
    from trainsup.checkpoint.formats.readers.hdf5 import check_hdf5_fd

    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        check_hdf5_fd(fd, os.fstat(fd).st_size)
        return False
    except Invalid:
        return True
    finally:
        os.close(fd)


def test_keras_backup_and_restore_killed_inside_its_in_place_write_goes_on_from_a_valid_checkpoint(daemon):
    """Found with Keras' own BackupAndRestore (no trainsup import) killed inside its in-place
    write of latest.weights.h5: every relaunch's fit() loaded the truncated backup and raised
    OSError (bad object header version number) until the job was `failed`, with valid .keras
    checkpoints beside it. The broken backup goes aside before the relaunch; the relaunch
    gets the newest valid .keras as TRAINSUP_RESUME_FROM and trains on."""
    ckpt = write_job(daemon, "kplain", "train_keras_plain.py", "--pad-mb", "16", "--sleep-per-step", "0.005",
                     env=KERAS_ENV)
    job = daemon.jobs / "kplain.yaml"
    job.write_text(job.read_text().replace("keep_last: 100", "keep_last: 3"))
    daemon.start()
    wait_for(lambda: list(ckpt.glob("epoch*.keras")) and (ckpt / "training_metadata.json").exists(), 240,
             "kplain: a first .keras and backup", interval=0.1)
    backup = ckpt / "latest.weights.h5"
    pid = daemon.status("kplain")["pid"]
    n_resumes = len(resumed_lines(daemon, "kplain"))
    for _ in range(200):
        wait_for(lambda: _h5_being_written(backup), 60, "the backup's in-place write", interval=0.002)
        os.kill(pid, signal.SIGSTOP)
        if _h5_being_written(backup):         # stopped inside the write: nothing more gets written
            break
        os.kill(pid, signal.SIGCONT)
    else:
        raise AssertionError("never stopped inside the backup's write")
    newest = max(ckpt.glob("epoch*.keras"), key=lambda p: int(re.search(r"epoch(\d+)", p.name).group(1)))
    os.kill(pid, signal.SIGKILL)

    wait_for(lambda: len(resumed_lines(daemon, "kplain")) > n_resumes, 240, "kplain to resume after the kill",
             detail=lambda: f"history: {daemon.history('kplain')[-6:]}\nlog: {job_log(daemon, 'kplain')[-2000:]}")
    assert resumed_lines(daemon, "kplain")[-1] == str(newest)
    moved = [e for e in daemon.history("kplain") if e["kind"] == "moved-aside"]
    assert [e for e in moved if Path(e["path"]).name == "latest.weights.h5" and e["why"]], moved
    n = last_step(daemon, "kplain")
    wait_steps(daemon, "kplain", n + 20)
    assert daemon.status("kplain")["state"] == "running"
    assert [e["reason"] for e in daemon.history("kplain") if e["kind"] == "exit"] == ["signal SIGKILL"]
    assert "OSError" not in job_log(daemon, "kplain"), job_log(daemon, "kplain")[-3000:]
    daemon.cli("stop", "kplain", "--no-save")
