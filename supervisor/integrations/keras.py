"""Keras 3 (any backend): BackupAndRestore's files, written atomically, on the save signal.

    from trainsup.integrations.keras import TrainsupBackup
    model.fit(x, y, epochs=..., callbacks=[TrainsupBackup()])   # backup_dir: TRAINSUP_CHECKPOINT_DIR

TrainsupBackup is a `keras.callbacks.BackupAndRestore`: the same two files
(`latest.weights.h5`, then `training_metadata.json`, the commit marker) and the same
restore at the start of fit() (weights, optimizer state, initial epoch), so an existing
backup dir keeps working. What differs: each file is written to a dot-named temp file,
fsynced and renamed (Keras overwrites `latest.weights.h5` in place: a kill inside that
write destroys the only backup), and a save also happens at the next batch end after the
save signal. The metadata also records `step` (optimizer iterations) for the daemon.

A `preempt` notice: that save, then exit 0; SIGTERM: save, then exit 143. As with
BackupAndRestore, a restore mid-epoch re-runs that epoch's batches from its start (the
weights are those of the save). `delete_checkpoint` defaults to False here: the daemon
manages the dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras

from .. import contract, emergency
from ._common import log

__all__ = ["TrainsupBackup"]


class TrainsupBackup(keras.callbacks.BackupAndRestore):
    def __init__(self, backup_dir: str | None = None, save_freq: Any = "epoch",
                 delete_checkpoint: bool = False) -> None:
        d = backup_dir or os.environ.get(contract.CHECKPOINT_DIR)
        if not d:
            raise ValueError("TrainsupBackup: no backup_dir (pass one or set TRAINSUP_CHECKPOINT_DIR)")
        super().__init__(d, save_freq=save_freq, double_checkpoint=False, delete_checkpoint=delete_checkpoint)
        self.last_saved: Path | None = None
        self._batch_in_epoch = 0
        emergency.install()

    def on_train_begin(self, logs: Any = None) -> None:
        emergency.install()
        super().on_train_begin(logs)     # BackupAndRestore's restore: weights, optimizer, epoch

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._current_epoch = epoch
        self._batch_in_epoch = 0

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._current_epoch = epoch + 1
        self._batch_in_epoch = 0
        if self.save_freq == "epoch":
            self.save()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._batch_in_epoch = batch + 1
        req = emergency.take()
        periodic = isinstance(self.save_freq, int) and self.save_freq > 0 and \
            int(self.model.optimizer.iterations) % self.save_freq == 0
        if req is None:
            if periodic:
                self.save()
            return
        path = self.save()
        code = emergency.served(req, path)
        if code is not None:
            self.model.stop_training = True
            log(f"saved {path} for {'preemption' if code == 0 else 'SIGTERM'}; exiting {code}")
            raise SystemExit(code)

    def save(self) -> Path:
        """Write latest.weights.h5, then training_metadata.json, each atomically."""
        d = Path(self.backup_dir)
        d.mkdir(parents=True, exist_ok=True)
        weights = Path(self._weights_path)
        marker = Path(self._training_metadata_path)
        tmp = d / f".latest.tmp.{os.getpid()}.weights.h5"   # Keras wants the .weights.h5 suffix
        tmp_meta = emergency.tmp_name(marker)
        meta = {"epoch": self._current_epoch, "batch": self._batch_in_epoch,
                "step": int(self.model.optimizer.iterations)}
        try:
            self.model.save_weights(str(tmp), overwrite=True)
            tmp_meta.write_bytes(json.dumps(meta).encode())
            # both written, then both synced (one journal commit on ext4), then renamed:
            # the weights first, the metadata (the commit marker) last
            emergency.fsync_files([tmp, tmp_meta])
            os.replace(tmp, weights)
            os.replace(tmp_meta, marker)
        except BaseException:
            tmp.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
            raise
        emergency.fsync_dir(d)
        self.last_saved = weights
        return weights
