"""Lightning with TrainsupCallback under a real daemon."""

from __future__ import annotations

import os
import re
import signal

from conftest import wait_for
from fw import (
    SCRIPTS,
    bit_exact_after_preemptions,
    exits,
    job_log,
    need,
    resumed_lines,
    scenario,
    wait_steps,
    write_job,
)

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


def test_under_slurm_lightning_keeps_the_requeue_signal_and_trainsup_handles_sigterm(tmp_path):
    """With a SLURM environment Lightning's own handler owns SIGUSR1 (hpc_ckpt_N.ckpt and
    `scontrol requeue`): the callback leaves it alone and still saves and exits 143 on SIGTERM."""
    import subprocess
    import sys

    from fw import REPO, SCRIPTS

    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSUP_", "SLURM_"))}
    env.update(PYTHONPATH=str(REPO), TRAINSUP_CHECKPOINT_DIR=str(ckpt), SLURM_JOB_ID="4242", SLURM_NTASKS="1",
               SLURM_JOB_NAME="train", SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0", OMP_NUM_THREADS="1")
    log = tmp_path / "out.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, str(SCRIPTS / "train_lightning.py"), "--steps", "100000",
                              "--every", "100000", "--sleep-per-step", "0.01"], env=env, stdout=out, stderr=out)
    try:
        wait_for(lambda: re.search(r"^step 10$", log.read_text(), re.M), 120, "training to start")
        assert "Lightning's SLURM handler owns the save signal" in log.read_text()
        p.send_signal(signal.SIGUSR1)
        wait_for(lambda: (ckpt / "hpc_ckpt_1.ckpt").exists(), 60, "Lightning's own SLURM save")
        assert p.poll() is None, "SIGUSR1 must not end the run under SLURM"
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 143, log.read_text()[-2000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert len(pl_ckpts(ckpt)) == 1 and list(pl_ckpts(ckpt))[0].name.startswith("trainsup-")


def test_lightning_rotation_keeps_model_checkpoint_top_k_and_best_model_path(daemon, tmp_path):
    """Found with keep_last tighter than ModelCheckpoint's save_top_k: trainsup's rotation
    deleted the top-k files and best_model_path, so trainer.validate(ckpt_path="best") raised
    FileNotFoundError at the end of every run and the job crash-looped into `failed`. Here
    the best 3 are the first saves (monitor step, mode min) and keep_last is 2."""
    script = tmp_path / "train_lightning.py"
    text = (SCRIPTS / "train_lightning.py").read_text()
    for old, new in (("save_top_k=-1", 'save_top_k=3, monitor="step", mode="min"'),
                     ("    def configure_optimizers(self):",
                      "    def validation_step(self, batch, batch_idx):\n"
                      "        return self.training_step(batch, batch_idx)\n\n"
                      "    def configure_optimizers(self):"),
                     ("    trainer.fit(model, data, ckpt_path=resume)\n",
                      "    trainer.fit(model, data, ckpt_path=resume)\n"
                      '    trainer.validate(model, data, ckpt_path="best", verbose=False)\n'
                      '    print(f"validated {trainer.checkpoint_callback.best_model_path}", flush=True)\n')):
        assert old in text, old
        text = text.replace(old, new)
    script.write_text(text)
    ckpt = write_job(daemon, "plbest", str(script), "--steps", "60", "--every", "3", "--sleep-per-step", "0.05")
    job = daemon.jobs / "plbest.yaml"
    job.write_text(job.read_text().replace("keep_last: 100", "keep_last: 2"))
    daemon.start()
    daemon.wait_state("plbest", "finished", "failed", timeout=240)
    log = job_log(daemon, "plbest")
    assert daemon.status("plbest")["state"] == "finished", log[-3000:]
    assert [e["code"] for e in exits(daemon, "plbest")] == [0], log[-3000:]
    best = sorted(ckpt.glob("*.ckpt"), key=lambda p: int(re.search(r"step=(\d+)", p.name).group(1)))
    assert [p.name for p in best][:3] == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt", "epoch=0-step=9.ckpt"], best
    assert f"validated {ckpt / 'epoch=0-step=3.ckpt'}" in log, log[-2000:]
