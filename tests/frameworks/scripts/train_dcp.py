"""A typical FSDP2 script with torch.distributed.checkpoint, 2 ranks on CPU over gloo, run by
torchrun (`python -m torch.distributed.run --standalone --nproc_per_node 2 train_dcp.py`).

Saves `step_N/` every --every steps (async_save on its own gloo group with --async), on
trainsup's agreed request, and resumes with dcp.load from TRAINSUP_RESUME_FROM.
--kill-at-commit K: on the first attempt, rank 0 SIGKILLs itself inside the K-th save
after every shard is written and before `.metadata` (the storage writer's finish()).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from trainsup.integrations.distributed import agreed_request, saved


class KilledBeforeCommit(FileSystemWriter):
    def finish(self, metadata, results):        # every shard is on disk; `.metadata` is next
        print("killing myself before the commit", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--last-periodic", type=int, default=0, help="no periodic save after this step (0: none)")
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--kill-at-commit", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ckpt_dir = os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "out"
    first_attempt = os.environ.get("TRAINSUP_ATTEMPT", "1") == "1"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = 0
    resume = os.environ.get("TRAINSUP_RESUME_FROM")
    if resume:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=resume)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step = int(state["step"])
        if rank == 0:
            print(f"resuming from {resume}", flush=True)
    ckpt_group = dist.new_group(backend="gloo") if args.use_async else None
    pending = None
    saves = 0
    while step < args.steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if rank == 0:
            print(f"step {step}", flush=True)
        req = agreed_request()
        if req or (step % args.every == 0 and not 0 < args.last_periodic < step):
            path = os.path.join(ckpt_dir, f"step_{step}")
            saves += 1
            if rank == 0:
                print(f"saving step {step}", flush=True)
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd, "step": torch.tensor(step)}
            kill = first_attempt and saves == args.kill_at_commit and rank == 0
            writer = (KilledBeforeCommit if kill else FileSystemWriter)(path)
            if pending is not None:
                pending.result()
                pending = None
            if args.use_async and req is None:
                pending = dcp.async_save(state, storage_writer=writer, process_group=ckpt_group)
            else:
                dcp.save(state, storage_writer=writer)
            saved(req, path)
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    if pending is not None:
        pending.result()
    msd, _ = get_state_dict(model, opt)
    full = {k: v.full_tensor() for k, v in msd.items()}
    if rank == 0:
        h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in full.values()))
        print(f"finished step {step} weights {h.hexdigest()[:16]}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
