"""A typical Keras 3 script with Keras' own BackupAndRestore and ModelCheckpoint, no trainsup
import: what the README says a plain BackupAndRestore user gets. It resumes from
TRAINSUP_RESUME_FROM when that is one of its `.keras` files (the daemon names one when
the backup is gone); otherwise BackupAndRestore restores its backup by itself."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402


class PrintSteps(keras.callbacks.Callback):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep

    def on_train_batch_end(self, batch, logs=None):
        print(f"step {int(self.model.optimizer.iterations)}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pad-mb", type=int, default=0)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    args = p.parse_args()
    d = os.environ["TRAINSUP_CHECKPOINT_DIR"]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = np.sin(x.sum(1, keepdims=True)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)])
    if args.pad_mb:     # a large extra state (an EMA copy, an embedding table): saves take a while
        model.pad = model.add_weight(shape=(args.pad_mb << 18,), initializer="zeros", trainable=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    initial_epoch = 0
    resume = os.environ.get("TRAINSUP_RESUME_FROM", "")
    if resume.endswith(".keras"):
        model.load_weights(resume)
        initial_epoch = int(re.search(r"epoch(\d+)", resume).group(1))
        print(f"resuming from {resume}", flush=True)
    model.fit(x, y, batch_size=16, epochs=1000, initial_epoch=initial_epoch, verbose=0, shuffle=False,
              callbacks=[PrintSteps(args.sleep_per_step), keras.callbacks.BackupAndRestore(d),
                         keras.callbacks.ModelCheckpoint(os.path.join(d, "epoch{epoch:02d}.keras"))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
