"""Hugging Face Trainer with TrainsupCallback under a real daemon."""

from __future__ import annotations

import os

from conftest import wait_for
from fw import (
    SCRIPTS,
    bit_exact_after_preemptions,
    exits,
    last_step,
    need,
    resumed_lines,
    scenario,
    wait_steps,
    write_job,
)
from fw_formats import hf_complete

need("transformers")


def test_hf_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "hf", "train_hf.py", "--steps", "100000", "--every", "1000", "--sleep-per-step", "0.02")
    scenario(daemon, "hf", hf_complete)


def test_hf_bit_exact_after_three_preemptions(daemon, tmp_path):
    bit_exact_after_preemptions(daemon, tmp_path, "hfx", "train_hf.py",
                                ["--steps", "60", "--every", "1000", "--sleep-per-step", "0.03"])


def test_hf_preemption_checkpoint_survives_save_total_limit_1_with_load_best_model_at_end(daemon, tmp_path):
    """Found with save_total_limit=1 and load_best_model_at_end=True: the callback exited in
    on_train_end, after transformers' _load_best_model() and its own rotation had deleted
    every checkpoint but the best (here the first: greater_is_better on the eval loss), the
    preemption's included; the relaunch resumed from the older best."""
    script = tmp_path / "train_hf.py"
    text = (SCRIPTS / "train_hf.py").read_text()
    for old, new in (('save_strategy="steps", save_steps=args.every,',
                      'save_strategy="steps", save_steps=args.every, eval_strategy="steps", eval_steps=args.every, '
                      'save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss", '
                      'greater_is_better=True,'),
                     ("train_dataset=Tokens(64),", "train_dataset=Tokens(64), eval_dataset=Tokens(4),")):
        assert old in text, old
        text = text.replace(old, new)
    script.write_text(text)
    ckpt = write_job(daemon, "hfbest", str(script), "--steps", "100000", "--every", "5", "--sleep-per-step", "0.02")
    daemon.start()
    wait_steps(daemon, "hfbest", 13)                 # two evaluated saves: the best is checkpoint-5
    r = daemon.cli("preempt", "hfbest", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state("hfbest", "preempted", timeout=60)
    assert exits(daemon, "hfbest")[-1]["code"] == 0
    step = last_step(daemon, "hfbest")
    assert f"saved at step {step}" in r.stdout, r.stdout
    assert (ckpt / f"checkpoint-{step}") in hf_complete(ckpt), \
        f"the preemption's checkpoint-{step} is gone: {sorted(os.listdir(ckpt))}"
    n = len(resumed_lines(daemon, "hfbest"))
    assert daemon.cli("start", "hfbest").returncode == 0
    wait_for(lambda: len(resumed_lines(daemon, "hfbest")) > n, 180, "hfbest to resume")
    assert resumed_lines(daemon, "hfbest")[-1] == str(ckpt / f"checkpoint-{step}")
    daemon.cli("stop", "hfbest", "--no-save")
