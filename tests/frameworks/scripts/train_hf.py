"""A typical small Hugging Face Trainer script using trainsup's callback (CPU, deterministic).

A 1-layer GPT-2 built from a config (nothing is downloaded) on synthetic token data.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch
from trainsup.integrations.hf import TrainsupCallback, resume_checkpoint
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class PrintSteps(TrainerCallback):
    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_step_end(self, args, state, control, **kw):
        print(f"step {state.global_step}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--final-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "out"
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    targs = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=args.every, logging_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Tokens(64),
                      callbacks=[PrintSteps(args.sleep_per_step), TrainsupCallback()])
    resume = resume_checkpoint(out)
    if resume:
        print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
    print(f"finished step {trainer.state.global_step} weights {h.hexdigest()[:16]}", flush=True)
    if args.final_out:
        torch.save(model.state_dict(), args.final_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
