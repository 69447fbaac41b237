"""A typical small Keras 3 (TensorFlow backend) script using trainsup's TrainsupBackup."""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from trainsup.integrations.keras import TrainsupBackup  # noqa: E402


class PrintSteps(keras.callbacks.Callback):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep

    def on_epoch_begin(self, epoch, logs=None):
        # After TrainsupBackup's restore (on_train_begin), before the first batch.
        it, self.first = int(self.model.optimizer.iterations), getattr(self, "first", True)
        if it and self.first:
            print(f"resuming from {os.path.join(os.environ['TRAINSUP_CHECKPOINT_DIR'], 'latest.weights.h5')}"
                  f" at step {it}", flush=True)
        self.first = False

    def on_train_batch_end(self, batch, logs=None):
        print(f"step {int(self.model.optimizer.iterations)}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    args = p.parse_args()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = np.sin(x.sum(1, keepdims=True)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    # Callbacks run in list order: the save sees the step PrintSteps just printed.
    model.fit(x, y, batch_size=16, epochs=args.epochs, verbose=0, shuffle=False,
              callbacks=[PrintSteps(args.sleep_per_step), TrainsupBackup(save_freq="epoch")])
    print(f"finished step {int(model.optimizer.iterations)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
