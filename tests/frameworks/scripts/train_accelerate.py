"""A typical HF Accelerate script (2 CPU processes over gloo, run by torchrun):
ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=--total-limit) so
`save_state()` writes `<dir>/checkpoints/checkpoint_<N>` and prunes itself; the training
step is a registered object (custom_checkpoint_0.pkl). Resumes with
`load_state(TRAINSUP_RESUME_FROM)`. --kill-in-save K: on the first attempt the main
process SIGKILLs itself inside the K-th save_state, after its RNG states and before the
registered step (custom_checkpoint_0.pkl).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

import accelerate.checkpointing as ack
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from trainsup.integrations.distributed import agreed_request, saved


class Progress:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--total-limit", type=int, default=None)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--last-periodic", type=int, default=0, help="no periodic save after this step (0: none)")
    p.add_argument("--kill-in-save", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt_dir = os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "out"
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=ckpt_dir, automatic_checkpoint_naming=True, total_limit=args.total_limit))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.9)
    model, opt, sched = acc.prepare(model, opt, sched)
    progress = Progress()
    acc.register_for_checkpointing(progress)
    resume = os.environ.get("TRAINSUP_RESUME_FROM")
    if resume:
        acc.load_state(resume)
        # automatic naming restarts at checkpoint_0 in a new process: go on after the loaded one
        acc.project_configuration.iteration = int(resume.rsplit("_", 1)[1]) + 1
        if acc.is_main_process:
            print(f"resuming from {resume}", flush=True)
    saves = 0
    if os.environ.get("TRAINSUP_ATTEMPT", "1") == "1" and args.kill_in_save and acc.is_main_process:
        real = ack.save_custom_state

        def save_custom_state(*a, **kw):
            if saves == args.kill_in_save:
                print("killing myself inside save_state", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)

        import accelerate.accelerator
        accelerate.accelerator.save_custom_state = save_custom_state
    while progress.step < args.steps:
        g = torch.Generator().manual_seed(progress.step * 2 + acc.process_index)
        x = torch.randn(8, 8, generator=g)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        progress.step += 1
        if acc.is_main_process:
            print(f"step {progress.step}", flush=True)
        req = agreed_request()
        if req or (progress.step % args.every == 0 and not 0 < args.last_periodic < progress.step):
            saves += 1
            if acc.is_main_process:
                print(f"saving step {progress.step}", flush=True)
            where = acc.save_state()
            saved(req, where)
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    if acc.is_main_process:
        sd = acc.unwrap_model(model).state_dict()
        h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in sd.values()))
        print(f"finished step {progress.step} weights {h.hexdigest()[:16]}", flush=True)
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
