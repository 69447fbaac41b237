"""Keras 3 (TensorFlow backend) with TrainsupBackup under a real daemon."""

from __future__ import annotations

import json

from fw import need, need_daemon_format, scenario, write_job

need("keras")
need("tensorflow")
need_daemon_format("keras")


def keras_ckpts(d):
    try:
        meta = json.loads((d / "training_metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    w = d / "latest.weights.h5"
    return {w: int(meta["step"])} if w.exists() else {}


def test_keras_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "keras", "train_keras.py", "--sleep-per-step", "0.02", env={"KERAS_BACKEND": "tensorflow"})
    scenario(daemon, "keras", keras_ckpts, startup=240)
