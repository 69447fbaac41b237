"""A typical DeepSpeed script (ZeRO stage 2, CPU accelerator, 2 ranks over gloo, run by
torchrun): `engine.save_checkpoint(save_dir)` every --every steps and on trainsup's agreed
request, resumed with `engine.load_checkpoint(save_dir, tag)` from TRAINSUP_RESUME_FROM.
--kill-in-save K: on the first attempt rank 0 SIGKILLs itself inside the K-th save, right
after writing its model states (before its optimizer states, the barrier and `latest`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trainsup.integrations.distributed import agreed_request, saved  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--last-periodic", type=int, default=0, help="no periodic save after this step (0: none)")
    p.add_argument("--kill-in-save", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ckpt_dir = os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "out"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": 2}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    resume = os.environ.get("TRAINSUP_RESUME_FROM")
    if resume:
        engine.load_checkpoint(os.path.dirname(resume), tag=os.path.basename(resume))
        if rank == 0:
            print(f"resuming from {resume}", flush=True)
    saves = 0
    if os.environ.get("TRAINSUP_ATTEMPT", "1") == "1" and args.kill_in_save and rank == 0:
        real_save = engine.checkpoint_engine.save

        def save(state_dict, path):
            real_save(state_dict, path)
            if saves == args.kill_in_save and path.endswith("mp_rank_00_model_states.pt"):
                print("killing myself inside the save", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        engine.checkpoint_engine.save = save
    while engine.global_steps < args.steps:
        step = engine.global_steps
        g = torch.Generator().manual_seed(step * 2 + rank)
        x = torch.randn(8, 8, generator=g)
        loss = (engine(x) - x[:, :4]).pow(2).mean()
        engine.backward(loss)
        engine.step()
        step = engine.global_steps
        if rank == 0:
            print(f"step {step}", flush=True)
        req = agreed_request()
        if req or (step % args.every == 0 and not 0 < args.last_periodic < step):
            saves += 1
            if rank == 0:
                print(f"saving step {step}", flush=True)
            engine.save_checkpoint(ckpt_dir)
            saved(req, os.path.join(ckpt_dir, f"global_step{step}"))
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    if rank == 0:
        sd = engine.module.state_dict()
        h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in sd.values()))
        print(f"finished step {engine.global_steps} weights {h.hexdigest()[:16]}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
