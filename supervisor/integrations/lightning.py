"""PyTorch Lightning: emergency saves, a restartable exit on SIGTERM, and resume.

    from trainsup.integrations.lightning import TrainsupCallback, ckpt_path
    trainer = L.Trainer(..., callbacks=[TrainsupCallback()])
    trainer.fit(model, data, ckpt_path=ckpt_path())

On the save signal the callback saves at the next `on_train_batch_end` through
`trainer.save_checkpoint` (the full state: loops, optimizers, callbacks) into a dot-named
temp file next to the target, fsyncs and renames it to
`trainsup-epoch=E-step=S.ckpt` in the ModelCheckpoint's dirpath (else
TRAINSUP_CHECKPOINT_DIR, else default_root_dir): never the non-atomic cross-device move
Lightning's own save makes when $TMPDIR is another filesystem.

A `preempt` notice: that save, then exit 0. SIGTERM: Lightning stops at the next batch
with SIGTERMException, which exits 0 and makes the run look finished; the callback saves
first and turns the exit status into 143, so the job is restarted.

Under SLURM (SLURMEnvironment with auto_requeue) Lightning installs its own handler for
the requeue signal (SIGUSR1 by default): it writes `hpc_ckpt_N.ckpt` into
default_root_dir and runs `scontrol requeue`. The callback leaves that alone: it catches
the save signal only when that handler is not there (or the save signal is another
one, e.g. `emergency_save.signal: SIGUSR2`), and still handles SIGTERM. Outside SLURM
Lightning catches neither signal.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .. import contract, emergency
from ._common import log, resume_env, under_daemon

__all__ = ["TrainsupCallback", "ckpt_path"]

_STEP_RE = re.compile(r"step=(\d+)")


def _complete_zip(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:     # reads the central directory at the end
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def ckpt_path(dir: str | None = None) -> str | None:
    """What to pass to `trainer.fit(..., ckpt_path=...)`: TRAINSUP_RESUME_FROM under the
    daemon (None when nothing valid); outside it, the `.ckpt` with the highest step in dir
    (default TRAINSUP_CHECKPOINT_DIR, searched recursively, so lightning_logs/ too) whose
    zip is complete. Never `"last"`, which in a new process looks in the new version_N/."""
    env = resume_env()
    if env or under_daemon():
        return env
    d = dir or os.environ.get(contract.CHECKPOINT_DIR)
    if not d or not Path(d).is_dir():
        return None
    cands = []
    for p in Path(d).rglob("*.ckpt"):
        if p.name.startswith(".") or p.is_symlink():
            continue
        m = _STEP_RE.search(p.name)
        cands.append((int(m.group(1)) if m else -1, p.stat().st_mtime, p))
    for _, _, p in sorted(cands, reverse=True):
        if _complete_zip(p):
            return str(p)
    return None


class TrainsupCallback(Callback):
    """Save on the save signal at the next batch end; after a preempt notice exit 0, after
    SIGTERM save and exit 143."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.last_saved: Path | None = None
        self._term_saved = False

    # Lightning registers its handlers in fit() after `setup`; installing ours here puts
    # them first, and Lightning's SIGTERM handler chains to ours.
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = trainer._accelerator_connector.cluster_environment
        from lightning.fabric.plugins.environments import SLURMEnvironment

        slurm_owns = isinstance(env, SLURMEnvironment) and env.auto_requeue and \
            env.requeue_signal == emergency.save_signal_number()
        if slurm_owns:
            log("Lightning's SLURM handler owns the save signal (it saves hpc_ckpt_N.ckpt and requeues); "
                "trainsup handles SIGTERM only")
            emergency.install_sigterm_only()
        else:
            emergency.install()

    def _target_dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            return Path(cb.dirpath)
        return Path(os.environ.get(contract.CHECKPOINT_DIR) or trainer.default_root_dir)

    def _save(self, trainer: pl.Trainer) -> Path:
        d = self._target_dir(trainer)
        final = d / f"trainsup-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
        tmp = emergency.tmp_name(final)
        if trainer.is_global_zero:
            d.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(tmp))          # every rank calls it (a collective)
        if trainer.is_global_zero:
            emergency.fsync_files([tmp])
            os.replace(tmp, final)
            emergency.fsync_dir(d)
        trainer.strategy.barrier("trainsup_save")
        self.last_saved = final
        return final

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        req = emergency.take()
        if req is None:
            return
        path = self._save(trainer)
        if req.kind == "terminate":
            self._term_saved = True
        code = emergency.served(req, path)
        if code is not None:
            log(f"saved {path.name} for {'preemption' if code == 0 else 'SIGTERM'}; exiting {code}")
            raise SystemExit(code)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # SIGTERM landed outside a training batch (validation, epoch end): Lightning raises
        # SIGTERMException (exit 0). Save if it was not saved yet, and exit non-zero.
        if isinstance(exception, SIGTERMException):
            if not self._term_saved:
                req = emergency.take() or emergency.Request("terminate")
                try:
                    path = self._save(trainer)
                    emergency.served(req, path)
                    log(f"saved {path.name} for SIGTERM")
                except Exception as e:   # the exit status still says "restart me"
                    log(f"save on SIGTERM failed: {e}")
            exception.code = emergency.TERM_EXIT
