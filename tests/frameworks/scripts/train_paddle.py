"""A typical small paddle.Model.fit script using trainsup's callback (CPU)."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import paddle
from trainsup.integrations.paddle import TrainsupCallback


class Data(paddle.io.Dataset):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(256, 8)).astype("float32")
        self.y = np.sin(self.x.sum(1, keepdims=True)).astype("float32")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class PrintSteps(paddle.callbacks.Callback):
    def __init__(self, ts: TrainsupCallback, sleep: float) -> None:
        super().__init__()
        self.ts, self.sleep = ts, sleep

    def on_epoch_begin(self, epoch, logs=None):
        # After the trainsup callback's restore (its on_train_begin runs after ours).
        if self.ts.resumed_from and not getattr(self, "said", False):
            self.said = True
            print(f"resuming from {self.ts.resumed_from} at step {self.ts.global_step}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {self.ts.epoch} done", flush=True)

    def on_train_batch_end(self, step, logs=None):
        # Runs before the trainsup callback, which counts this batch and may save and exit.
        print(f"step {self.ts.global_step + 1}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    args = p.parse_args()
    paddle.set_device("cpu")
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(8, 32), paddle.nn.Tanh(), paddle.nn.Linear(32, 1))
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Adam(learning_rate=1e-2, parameters=net.parameters()), paddle.nn.MSELoss())
    ts = TrainsupCallback()
    # epochs_left: fit() counts from epoch 0 at every launch; a resumed run skips the finished ones
    model.fit(Data(), batch_size=16, epochs=ts.epochs_left(args.epochs), verbose=0, shuffle=False,
              callbacks=[PrintSteps(ts, args.sleep_per_step), ts])
    print(f"finished step {ts.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
