"""Example job: a small MLP on synthetic data, checkpointed by trainsup.training.

Runs alone (`python train_mlp.py`) or under `torchrun --nproc-per-node N` (DDP, gloo).
Everything random is seeded, so an interrupted-and-resumed run ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainsup.training import Checkpointer, ResumableSampler


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=100, help="checkpoint every N steps (0 = off)")
    p.add_argument("--every-seconds", type=float, default=None)
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="slow down for demos")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--sync-every", type=int, default=None,
                   help="ranks agree on save requests every N steps (default: adaptive, <=1 s)")
    p.add_argument("--sharded", action="store_true",
                   help="model/optimizer through torch.distributed.checkpoint (each rank its part)")
    p.add_argument("--ckpt-dir", default=None, help="default: TRAINSUP_CHECKPOINT_DIR, else ./ckpt")
    p.add_argument("--final-out", default=None, help="torch.save the final model state here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-timeout", type=float, default=None,
                   help="process-group timeout in seconds (torch's default is 30 min: a lost peer hangs that long)")
    return p.parse_args(argv)


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def install_test_save_gate() -> None:
    # Test hook: hold the first save between its durable phases until the test says go,
    # so a test can deliver a signal while a save is provably in progress.
    gate = os.environ.get("TRAINSUP_TEST_SAVE_GATE")
    if not gate:
        return
    from trainsup.checkpoint import format as fmt

    def hook(phase: str) -> None:
        if phase != "files-synced" or getattr(hook, "done", False):
            return
        hook.done = True
        Path(gate, "saving").touch()
        deadline = time.monotonic() + 60
        while not Path(gate, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    fmt.phase_hook = hook


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        timeout = datetime.timedelta(seconds=args.pg_timeout) if args.pg_timeout else None
        dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank() if distributed else 0

    torch.manual_seed(args.seed)  # same initial weights on every rank
    data = make_data(args.samples, args.seed)
    model = nn.Sequential(nn.Linear(16, args.hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(args.hidden, 1))
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.7)
    torch.manual_seed(args.seed + 1000 + rank)  # dropout differs per rank, reproducibly

    sampler = ResumableSampler(len(data), seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    ckpt_dir = args.ckpt_dir or os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "ckpt"
    ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, sampler=sampler,
                        every_steps=args.every or None, every_seconds=args.every_seconds,
                        dir=ckpt_dir, async_save=args.async_save, sharded=args.sharded,
                        sync_every=args.sync_every)
    install_test_save_gate()

    try:
        step = ckpt.restore()
    except RuntimeError as e:  # a bad TRAINSUP_RESUME_FROM: one line, not a traceback
        print(f"train_mlp: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        if step:
            print(f"resumed from step {step} ({ckpt.resumed_from})", flush=True)
        else:
            print(f"starting fresh (attempt {os.environ.get('TRAINSUP_ATTEMPT', '1')})", flush=True)
    loss_fn = nn.MSELoss()
    loss = torch.zeros(())
    while step < args.steps and not ckpt.should_stop:
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if rank == 0 and args.log_every and step % args.log_every == 0:
                print(f"step {step} epoch {sampler.epoch} loss {loss.item():.5f}", flush=True)
            ckpt.step(step, metrics={"loss": loss.item()})
            if args.sleep_per_step:
                time.sleep(args.sleep_per_step)
            if step >= args.steps or ckpt.should_stop:
                break
    ckpt.save(step, reason="final", metrics={"loss": loss.item()})
    ckpt.close()
    if rank == 0:
        if ckpt.should_stop and step < args.steps:
            print(f"stopping at step {step}: saved for preemption", flush=True)
        else:
            print(f"finished step {step} weights {weights_hash(model)}", flush=True)
            if args.final_out:
                torch.save(model.state_dict(), args.final_out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if ckpt.stop_is_remote:
        # Another node was preempted; this node was not. Exit 75 (EX_TEMPFAIL), not 0, so that
        # torchrun (--max-restarts) restarts this node's worker into a new rendezvous and its
        # daemon does not take the job for finished.
        print("another node's preemption stopped this one: exit 75 to rejoin", flush=True)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())
