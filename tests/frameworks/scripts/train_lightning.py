"""A typical small Lightning script using trainsup's callback (deterministic on CPU).

Batches are a function of global_step, so a resumed run sees the same data whatever
Lightning's (non-resumable) loader position is; no dropout, so no RNG state matters.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from trainsup.integrations.lightning import TrainsupCallback, ckpt_path


class Net(pl.LightningModule):
    def __init__(self, pad_mb: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        # Extra state to make a save slow when a test needs to land inside one.
        self.register_buffer("pad", torch.zeros(pad_mb << 18))

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(1000 + self.global_step)
        x = torch.randn(16, 8, generator=g)
        y = torch.sin(x.sum(1, keepdim=True))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class PrintSteps(pl.Callback):
    """Listed before TrainsupCallback: callbacks run in order, the module's hook after them."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        print(f"step {trainer.global_step}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--pad-mb", type=int, default=0)
    p.add_argument("--final-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    out = os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "ckpt"
    data = torch.utils.data.DataLoader(torch.arange(64), batch_size=1)
    trainer = pl.Trainer(
        max_steps=args.steps, max_epochs=-1, accelerator="cpu", devices=1, deterministic=True,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[PrintSteps(args.sleep_per_step),
                   ModelCheckpoint(dirpath=out, every_n_train_steps=args.every, save_top_k=-1),
                   TrainsupCallback()],
    )
    model = Net(args.pad_mb)
    resume = ckpt_path(out)
    if resume:
        print(f"resuming from {resume}", flush=True)
    trainer.fit(model, data, ckpt_path=resume)
    h = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for k, t in model.state_dict().items() if k != "pad"))
    print(f"finished step {trainer.global_step} weights {h.hexdigest()[:16]}", flush=True)
    if args.final_out:
        torch.save({k: v for k, v in model.state_dict().items() if k != "pad"}, args.final_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
