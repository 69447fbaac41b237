"""A plain PyTorch loop (no helper) made preemption-safe by two trainsup lines.

The tutorial way, `torch.save(state, "ckpt/last.pt")`, writes in place: a kill mid-save
leaves a broken last.pt that the next start loads and crashes on. The two changes:

    if trainsup.save_requested() or step % every == 0:     # 1: the save signal, as a flag
        trainsup.atomic_save(state, ckpt_dir / "last.pt")    # 2: tmp + fsync + rename

save_requested() comes first so a request is taken even at a periodic step. After a
`preempt` notice (or SIGTERM) atomic_save exits once the file is committed (0, resp. 143).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import trainsup
from torch import nn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--pad-mb", type=int, default=0, help="extra state, to make a save slow")
    p.add_argument("--final-out", default=None)
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    ckpt_dir = Path(os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "ckpt")
    last = ckpt_dir / "last.pt"
    g = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(256, 16, generator=g), torch.randn(16, 1, generator=g)
    y = torch.sin(x @ w_true)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pad = torch.zeros(args.pad_mb << 18)          # float32: 4 bytes each

    step = 0
    resume = os.environ.get("TRAINSUP_RESUME_FROM") or (str(last) if last.exists() else "")
    if resume:
        ck = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model_state_dict"])
        opt.load_state_dict(ck["optimizer_state_dict"])
        torch.set_rng_state(ck["rng"])
        step = int(ck["step"])
        print(f"resuming from {resume}", flush=True)

    while step < args.steps:
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        step += 1
        if args.log_every and step % args.log_every == 0:
            print(f"step {step} loss {loss.item():.5f}", flush=True)
        if trainsup.save_requested() or step % args.every == 0:
            state = {"step": step, "model_state_dict": model.state_dict(),
                     "optimizer_state_dict": opt.state_dict(), "rng": torch.get_rng_state(), "pad": pad}
            print(f"saving step {step}", flush=True)
            trainsup.atomic_save(state, last)
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
    print(f"finished step {step} weights {h.hexdigest()[:16]}", flush=True)
    if args.final_out:
        torch.save(model.state_dict(), args.final_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
