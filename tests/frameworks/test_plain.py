"""Plain PyTorch: the two-line change (save_requested + atomic_save), and the helper
(Checkpointer) under a real daemon."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import torch
from conftest import wait_for
from fw import (
    REPO,
    bit_exact_after_preemptions,
    exits,
    job_log,
    need,
    resumed_lines,
    scenario,
    steps_since_resume,
    write_job,
)

need("torch")

PLAIN = str(REPO / "jobs" / "train_plain_trainsup.py")
MLP = str(REPO / "jobs" / "train_mlp.py")


def plain_ckpts(d):
    p = d / "last.pt"
    try:
        return {p: int(torch.load(p, weights_only=True)["step"])}
    except Exception:
        return {}


def trainsup_ckpts(d):
    return {p: int(p.name.split("-")[1]) for p in d.glob("step-*") if (p / "MANIFEST.json").exists()}


def test_plain_script_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "plain", PLAIN, "--steps", "1000000", "--every", "100000", "--sleep-per-step", "0.01")
    scenario(daemon, "plain", plain_ckpts)


def test_helper_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "helper", MLP, "--steps", "1000000", "--every", "0", "--log-every", "1",
              "--sleep-per-step", "0.01")
    scenario(daemon, "helper", trainsup_ckpts)


def test_plain_script_killed_mid_atomic_save_is_never_offered_the_partial_file(daemon):
    ckpt = write_job(daemon, "torn", PLAIN, "--steps", "1000000", "--every", "3", "--pad-mb", "96",
                     "--sleep-per-step", "0.01")
    daemon.start()
    wait_for(lambda: (ckpt / "last.pt").exists(), 120, "the first complete save")
    good = plain_ckpts(ckpt)
    assert good, "last.pt is not loadable"
    # Land the kill inside a save: while the temp file is being written.
    tmp = wait_for(lambda: [p for p in ckpt.glob(".last.pt.tmp.*") if p.stat().st_size > 0], 120,
                   "a save in progress", interval=0.002)
    os.kill(daemon.status("torn")["pid"], signal.SIGKILL)
    committed_before_kill = plain_ckpts(ckpt)
    wait_for(lambda: resumed_lines(daemon, "torn"), 120, "the relaunch")
    assert resumed_lines(daemon, "torn")[-1] == str(ckpt / "last.pt")
    wait_for(lambda: len(steps_since_resume(daemon, "torn")) > 2, 120, "training after the relaunch")
    (step,) = committed_before_kill.values()
    assert steps_since_resume(daemon, "torn")[0] == step + 1
    assert daemon.status("torn")["state"] == "running"
    assert all(e["reason"] == "signal SIGKILL" for e in exits(daemon, "torn")), exits(daemon, "torn")
    assert str(tmp[0].name) not in job_log(daemon, "torn").split("[trainsup] attempt 2")[1]
    daemon.cli("stop", "torn", "--no-save")


def _legacy_last_pt(path, loadable: bool = True) -> None:
    """A last.pt as the plain script wrote it before switching to the helper (jobs/train_mlp.py's model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"epoch": 3, "step": 120, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}
    torch.save(obj if loadable else [1, 2, 3], path)


def test_helper_switch_with_an_old_last_pt_in_the_dir_ends_running_not_failed(daemon):
    """Regression (issue 13): the README's switch to the helper left last.pt in the dir; the
    daemon handed it over, restore() raised "MANIFEST.json unreadable: Not a directory" five
    times and the job was `failed`."""
    ckpt = write_job(daemon, "switch", MLP, "--steps", "1000000", "--every", "20", "--log-every", "1",
                     "--sleep-per-step", "0.01")
    _legacy_last_pt(ckpt / "last.pt")
    daemon.start()
    wait_for(lambda: trainsup_ckpts(ckpt), 120, f"a trainsup checkpoint: {job_log(daemon, 'switch')[-2000:]}")
    st = daemon.status("switch")
    assert st["state"] == "running" and st["restarts"] == 0, st
    assert "last.pt (a torch.save file from before the helper, step 120)" in job_log(daemon, "switch")
    assert min(trainsup_ckpts(ckpt).values()) > 120
    daemon.cli("stop", "switch", "--no-save")


def test_restore_refuses_an_unmappable_file_with_one_line_that_says_what_to_do(tmp_path):
    _legacy_last_pt(tmp_path / "ckpt" / "last.pt", loadable=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO), TRAINSUP_JOB="x", TRAINSUP_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
               TRAINSUP_RESUME_FROM=str(tmp_path / "ckpt" / "last.pt"))
    r = subprocess.run([sys.executable, MLP, "--steps", "5"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if "last.pt" in l]
    assert len(lines) == 1 and "set checkpoint.format: trainsup" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_local_run_outside_the_daemon_resumes_from_the_newest_valid_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSUP_")}
    env.update(PYTHONPATH=str(REPO))
    d = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, MLP, "--steps", "30", "--every", "10", "--ckpt-dir", str(d)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # The newest one is broken (a file shorter than its manifest says): the one before is taken.
    newest = max(trainsup_ckpts(d), key=lambda p: p.name)
    with open(newest / "state.pt", "r+b") as f:
        f.truncate(100)
    r = subprocess.run([sys.executable, MLP, "--steps", "40", "--every", "10", "--ckpt-dir", str(d)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^resumed from step 20 ", r.stdout, re.M), r.stdout


def test_save_requested_before_any_signal_is_false_and_installs_the_handler(tmp_path):
    code = ("import signal, trainsup, sys\n"
            "assert 'torch' not in sys.modules\n"
            "assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL\n"
            "assert trainsup.save_requested() is False\n"
            "assert callable(signal.getsignal(signal.SIGUSR1)) and callable(signal.getsignal(signal.SIGTERM))\n"
            "assert 'torch' not in sys.modules\n"
            "signal.raise_signal(signal.SIGUSR1)\n"
            "assert trainsup.save_requested() is True and trainsup.save_requested() is False\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr


def test_helper_bit_exact_after_three_preemptions(daemon, tmp_path):
    bit_exact_after_preemptions(daemon, tmp_path, "mlpx", MLP,
                                ["--steps", "80", "--every", "0", "--log-every", "1", "--sleep-per-step", "0.03"])
