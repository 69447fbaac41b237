"""Hugging Face transformers Trainer: emergency saves and resume.

    from trainsup.integrations.hf import TrainsupCallback, resume_checkpoint
    trainer = Trainer(..., args=TrainingArguments(output_dir=os.environ[contract.CHECKPOINT_DIR], ...),
                      callbacks=[TrainsupCallback()])
    trainer.train(resume_from_checkpoint=resume_checkpoint())

The save signal sets `control.should_save` at the next step end: the Trainer writes its
own `checkpoint-N/` (trainer_state.json last, the commit marker the daemon checks). A
`preempt` notice or SIGTERM also sets `should_training_stop`; once that save is written
the process exits (0 after a preempt notice, 143 after SIGTERM) from `on_train_end`, so
code after `trainer.train()` never runs as if training had finished.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .. import contract, emergency
from ._common import log, newest_numbered, resume_env, under_daemon

__all__ = ["TrainsupCallback", "resume_checkpoint"]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _complete(path: Path) -> bool:
    # trainer_state.json is written last; its global_step names the checkpoint.
    try:
        st = json.loads((path / "trainer_state.json").read_text())
        return int(st.get("global_step", -1)) == int(path.name.rsplit("-", 1)[1])
    except (OSError, ValueError, TypeError):
        return False


def _fsync_tree(path: Path) -> None:
    try:
        emergency.fsync_files([p for p in path.iterdir() if p.is_file() and not p.is_symlink()])
        emergency.fsync_dir(path)
        emergency.fsync_dir(path.parent)
    except OSError as e:
        log(f"fsync of {path}: {e.strerror}")


def resume_checkpoint(output_dir: str | None = None) -> str | None:
    """What to pass to `trainer.train(resume_from_checkpoint=...)`: TRAINSUP_RESUME_FROM
    under the daemon (None when there is nothing valid); outside it, the newest complete
    `checkpoint-N/` in output_dir (default TRAINSUP_CHECKPOINT_DIR). Never HF's own `True`,
    which takes the highest-numbered dir even when its save was killed half-way."""
    env = resume_env()
    if env or under_daemon():
        return env
    d = output_dir or os.environ.get(contract.CHECKPOINT_DIR)
    if not d:
        return None
    p = newest_numbered(Path(d), _CKPT_RE, _complete)
    return str(p) if p else None


class TrainsupCallback(TrainerCallback):
    """Turns the save signal into a Trainer save at the next step; stops after a
    preemption's save (exit 0) or SIGTERM's (exit 143)."""

    def __init__(self, exit_after_stop: bool = True) -> None:
        self.exit_after_stop = exit_after_stop
        self._req: emergency.Request | None = None
        self._exit: int | None = None
        emergency.install()   # the Trainer is built on the main thread: catch signals from now on

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        emergency.install()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        req = emergency.take()
        if req is None:
            return
        self._req = req
        control.should_save = True      # a periodic save due at this step serves it too
        if req.stops:
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        req, self._req = self._req, None
        if req is None:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _fsync_tree(path)   # the Trainer does not fsync: an emergency save must survive the VM going away
        code = emergency.served(req, path)
        if code is not None:
            self._exit = code
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._exit is not None and self.exit_after_stop:
            why = "preemption" if self._exit == 0 else "SIGTERM"
            log(f"saved checkpoint-{state.global_step} for {why}; exiting {self._exit}")
            raise SystemExit(self._exit)
