"""A typical small TF2 custom training loop: tf.train.Checkpoint + CheckpointManager (CPU).

The trainsup lines: `trainsup.save_requested()` once per step (the save signal as a flag),
a `manager.save` when it is true, then `trainsup.saved(path)` ("my save for this request is
done", for any save function), which ends the
process after a preempt (exit 0) or SIGTERM (exit 143) save. There is no TF integration: a
CheckpointManager save is already the commit protocol the daemon checks (the `checkpoint`
state file is its commit marker).

Resume is TF's own: `ckpt.restore(TRAINSUP_RESUME_FROM or manager.latest_checkpoint)`,
where TRAINSUP_RESUME_FROM is the `ckpt-N` prefix the daemon validated.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import trainsup  # noqa: E402


class MLP(tf.Module):
    def __init__(self, pad: int) -> None:
        super().__init__()
        init = tf.random.stateless_normal
        self.w1 = tf.Variable(init((8, 32), seed=(0, 1)) * 0.3, name="w1")
        self.b1 = tf.Variable(tf.zeros(32), name="b1")
        self.w2 = tf.Variable(init((32, 1), seed=(0, 2)) * 0.3, name="w2")
        self.b2 = tf.Variable(tf.zeros(1), name="b2")
        # Extra state (e.g. an EMA or a big embedding) to make a save slow in tests.
        self.pad = tf.Variable(tf.zeros(pad), trainable=False, name="pad") if pad else None

    def __call__(self, x):
        return tf.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2

    @property
    def params(self):
        return [self.w1, self.b1, self.w2, self.b2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--max-to-keep", type=int, default=0, help="CheckpointManager's own rotation (0: None)")
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--pad-mb", type=int, default=0, help="extra state, to make a save slow")
    args = p.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = np.sin(x.sum(1, keepdims=True)).astype("float32")
    model = MLP(args.pad_mb << 18)
    opt = tf.keras.optimizers.Adam(1e-2)
    step = tf.Variable(0, dtype=tf.int64, name="step")
    ckpt = tf.train.Checkpoint(step=step, model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(ckpt, os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "ckpt",
                                         max_to_keep=args.max_to_keep or None)

    resume = os.environ.get("TRAINSUP_RESUME_FROM") or manager.latest_checkpoint
    if resume:
        ckpt.restore(resume).assert_existing_objects_matched()
        print(f"resuming from {resume} at step {int(step)}", flush=True)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb) - yb) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.params), model.params))
        return loss

    while int(step) < args.steps:
        i = int(step) % 16 * 16
        loss = train_step(x[i:i + 16], y[i:i + 16])
        step.assign_add(1)
        n = int(step)
        print(f"step {n} loss {float(loss):.5f}", flush=True)
        if trainsup.save_requested() or n % args.every == 0:
            print(f"saving step {n}", flush=True)
            path = manager.save(checkpoint_number=n)
            trainsup.saved(path)    # after a preempt/SIGTERM save: exit 0/143; else nothing
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    h = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.params))
    print(f"finished step {int(step)} weights {h.hexdigest()[:16]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
