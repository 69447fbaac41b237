"""A typical PaddleOCR-style custom loop (tools/program.py) using trainsup's save/load helpers (CPU).

PaddleOCR saves `<save_model_dir>/latest.{pdparams,pdopt,states}` at every epoch end and
`iter_epoch_N.*` every `save_epoch_step` epochs, and resumes with `Global.checkpoints=<prefix>`
through load_model; it has no rotation of its own. The trainsup lines: `resume_prefix()` for
Global.checkpoints, and a `latest` save when `trainsup.save_requested()` (save_model exits
after a preempt/SIGTERM save).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import paddle
import trainsup
from trainsup.integrations.paddle import load_model, resume_prefix, save_model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=100000)
    p.add_argument("--batches", type=int, default=5, help="batches per epoch")
    p.add_argument("--save-epoch-step", type=int, default=1)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--pad-mb", type=int, default=0, help="extra state, to make a save slow")
    args = p.parse_args()
    paddle.set_device("cpu")
    paddle.seed(0)
    save_dir = os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "output"
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(args.batches * 16, 8)).astype("float32"))
    y = paddle.sin(x.sum(1, keepdim=True))
    net = paddle.nn.Sequential(paddle.nn.Linear(8, 32), paddle.nn.Tanh(), paddle.nn.Linear(32, 1))
    if args.pad_mb:   # a big buffer saved with the params (an EMA copy, an embedding table)
        net.register_buffer("pad", paddle.zeros([args.pad_mb << 18]))
    opt = paddle.optimizer.Adam(learning_rate=1e-2, parameters=net.parameters())

    ckpt = resume_prefix()                       # Global.checkpoints
    best = load_model(ckpt, net, opt)
    start_epoch, step = best.get("start_epoch", 1), best.get("global_step", 0)
    if ckpt:
        print(f"resuming from {ckpt} at step {step}", flush=True)

    for epoch in range(start_epoch, args.epochs + 1):
        for b in range(args.batches):
            loss = ((net(x[b * 16:(b + 1) * 16]) - y[b * 16:(b + 1) * 16]) ** 2).mean()
            loss.backward()
            opt.step()
            opt.clear_grad()
            step += 1
            print(f"step {step} loss {float(loss):.5f}", flush=True)
            if trainsup.save_requested():
                print(f"saving step {step}", flush=True)
                save_model(net, opt, save_dir, "latest", epoch=epoch, global_step=step)
            if args.sleep_per_step:
                time.sleep(args.sleep_per_step)
        save_model(net, opt, save_dir, "latest", epoch=epoch, global_step=step)
        if epoch % args.save_epoch_step == 0:
            save_model(net, opt, save_dir, f"iter_epoch_{epoch}", epoch=epoch, global_step=step)
    print(f"finished step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
