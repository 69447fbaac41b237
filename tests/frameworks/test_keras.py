"""Keras 3 (TensorFlow backend) with TrainsupBackup under a real daemon."""

from __future__ import annotations

from fw import need, need_daemon_format, scenario, write_job
from fw_formats import keras_backup_complete

need("keras")
need("tensorflow")
need_daemon_format("keras")


def test_keras_checkpoint_wait_sigkill_preempt_start(daemon):
    write_job(daemon, "keras", "train_keras.py", "--sleep-per-step", "0.02", env={"KERAS_BACKEND": "tensorflow"})
    scenario(daemon, "keras", keras_backup_complete, startup=240)
