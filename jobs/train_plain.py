"""Example job without the helper: checkpointing the way the tutorials do it, done right.

Its own save-signal flag (the handler does nothing else), torch.save to a temp file in the
checkpoint dir, fsync, os.replace to ckpt/model-<step>.pt, fsync of the dir; resume from
TRAINSUP_RESUME_FROM. trainsup validates these files as `torch` format (zip structure and
CRCs) without unpickling them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

_flags = {"save": False, "stop": False}


def _on_save_signal(signum, frame):
    _flags["save"] = True


def _on_sigterm(signum, frame):
    _flags["save"] = _flags["stop"] = True


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.parent / f".{path.name}.tmp.{os.getpid()}"  # a dot name is never a checkpoint
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the rename is durable only once the directory is synced
    finally:
        os.close(fd)


def batch_for(step: int, x: torch.Tensor, y: torch.Tensor, bs: int, seed: int):
    # The batch depends only on (seed, step): resuming needs no data-loader state.
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(0, len(x), (bs,), generator=g)
    return x[idx], y[idx]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="plain PyTorch job with atomic checkpoints")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--final-out", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    sig = os.environ.get("TRAINSUP_SAVE_SIGNAL") or "SIGUSR1"
    signal.signal(getattr(signal, sig if sig.startswith("SIG") else "SIG" + sig), _on_save_signal)
    signal.signal(signal.SIGTERM, _on_sigterm)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    ckpt_dir = Path(os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "ckpt")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(512, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g))
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.7)

    step = 0
    resume = os.environ.get("TRAINSUP_RESUME_FROM")
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        print(f"resumed from step {step} ({resume})", flush=True)

    def save() -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                           "step": step}, ckpt_dir / f"model-{step:08d}.pt")
        _flags["save"] = False

    loss = torch.zeros(())
    while step < args.steps:
        xb, yb = batch_for(step, x, y, 16, args.seed)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if args.log_every and step % args.log_every == 0:
            print(f"step {step} loss {loss.item():.5f}", flush=True)
        if _flags["save"] or (args.every and step % args.every == 0):
            save()
        if _flags["stop"]:
            print(f"stopping at step {step}: saved for preemption", flush=True)
            return 0
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    save()
    print(f"finished step {step}", flush=True)
    if args.final_out:
        torch.save(model.state_dict(), args.final_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
