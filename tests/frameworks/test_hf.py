"""Hugging Face Trainer with TrainsupCallback under a real daemon."""

from __future__ import annotations

import json
import re

from fw import bit_exact_after_preemptions, need, scenario, write_job

need("transformers")


def hf_ckpts(d):
    out = {}
    for p in d.glob("checkpoint-*"):
        try:
            st = json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if re.fullmatch(r"checkpoint-\d+", p.name) and st["global_step"] == int(p.name.split("-")[1]):
            out[p] = st["global_step"]
    return out


def test_hf_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "hf", "train_hf.py", "--steps", "100000", "--every", "1000", "--sleep-per-step", "0.02")
    scenario(daemon, "hf", hf_ckpts)


def test_hf_bit_exact_after_three_preemptions(daemon, tmp_path):
    bit_exact_after_preemptions(daemon, tmp_path, "hfx", "train_hf.py",
                                ["--steps", "60", "--every", "1000", "--sleep-per-step", "0.03"])
