"""Hugging Face Trainer with TrainsupCallback under a real daemon."""

from __future__ import annotations

from fw import bit_exact_after_preemptions, need, scenario, write_job
from fw_formats import hf_complete

need("transformers")


def test_hf_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "hf", "train_hf.py", "--steps", "100000", "--every", "1000", "--sleep-per-step", "0.02")
    scenario(daemon, "hf", hf_complete)


def test_hf_bit_exact_after_three_preemptions(daemon, tmp_path):
    bit_exact_after_preemptions(daemon, tmp_path, "hfx", "train_hf.py",
                                ["--steps", "60", "--every", "1000", "--sleep-per-step", "0.03"])
