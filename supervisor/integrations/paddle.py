"""PaddlePaddle: a callback for `paddle.Model.fit`, and PaddleOCR-style save/load helpers.

    from trainsup.integrations.paddle import TrainsupCallback
    model.fit(train_data, epochs=..., callbacks=[TrainsupCallback()])   # dir: TRAINSUP_CHECKPOINT_DIR

A custom loop (PaddleOCR's tools/program.py style):

    from trainsup.integrations.paddle import save_model, load_model, resume_prefix
    best = load_model(resume_prefix(), model, optimizer)      # {"start_epoch", "global_step", ...}
    ...  if trainsup.save_requested():
             save_model(model, optimizer, save_dir, "latest", epoch=epoch, global_step=step)

A checkpoint is PaddleOCR's prefix group `<prefix>.pdopt`, `<prefix>.pdparams`,
`<prefix>.states` (pickle protocol 2 of {"epoch", "global_step", "best_model_dict", ...}),
with the prefixes `latest`, `best_accuracy` and `iter_epoch_N`. paddle.save overwrites
in place; here each file is first written complete to a dot-named temp file and fsynced,
then the three are renamed in the write order (pdopt, pdparams, states: the marker last)
and the dir is fsynced, so a kill leaves the old group or the new one, except inside the
microseconds between those renames.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import paddle

from .. import contract, emergency
from ._common import log, resume_env, under_daemon

__all__ = ["TrainsupCallback", "save_model", "load_model", "resume_prefix"]

_ITER_RE = re.compile(r"^iter_epoch_(\d+)\.states$")


def _pickle_complete(path: Path) -> bool:
    import pickletools

    try:
        with open(path, "rb") as f:
            data = f.read()
        last = None
        for op, _, pos in pickletools.genops(data):   # parses, executes nothing
            last = (op.name, pos)
        return last is not None and last[0] == "STOP" and last[1] == len(data) - 1
    except Exception:
        return False


def _group_complete(prefix: Path) -> bool:
    files = [prefix.with_name(prefix.name + s) for s in (".pdparams", ".pdopt", ".states")]
    return all(f.exists() for f in files) and all(_pickle_complete(f) for f in files)


def _read_states(prefix: Path) -> dict:
    try:
        with open(prefix.with_name(prefix.name + ".states"), "rb") as f:
            st = pickle.load(f)
        return st if isinstance(st, dict) else {}
    except (OSError, pickle.UnpicklingError, EOFError):
        return {}


def resume_prefix(save_dir: str | None = None) -> str | None:
    """The prefix to resume from (PaddleOCR's `Global.checkpoints`): TRAINSUP_RESUME_FROM
    under the daemon; outside it, of `latest` and `iter_epoch_N` in save_dir (default
    TRAINSUP_CHECKPOINT_DIR) the complete group with the highest global_step."""
    env = resume_env()
    if env or under_daemon():
        return env
    d = Path(save_dir or os.environ.get(contract.CHECKPOINT_DIR) or "")
    if not str(d) or not d.is_dir():
        return None
    cands = [d / "latest"] + [d / n[: -len(".states")] for n in os.listdir(d) if _ITER_RE.match(n)]
    best: tuple[int, Path] | None = None
    for p in cands:
        if _group_complete(p):
            step = int(_read_states(p).get("global_step", -1))
            if best is None or step > best[0]:
                best = (step, p)
    return str(best[1]) if best else None


def save_model(model: Any, optimizer: Any, save_dir: str | os.PathLike, prefix: str = "latest", *,
               is_best: bool = False, exit_after_stop: bool = True, **states: Any) -> Path:
    """PaddleOCR's save_model, atomically: `<save_dir>/<prefix>.{pdopt,pdparams,states}`
    (+ `best_model/model.*` when is_best). `states` (epoch, global_step, best_model_dict,
    ...) is pickled with protocol 2 as PaddleOCR does. `model` may be a paddle.nn.Layer or
    a paddle.Model. When this save serves a preemption or SIGTERM taken with
    save_requested()/take(), the process exits after it (0, resp. 143)."""
    net = model.network if hasattr(model, "network") else model
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    groups = [d / prefix] + ([d / "best_model" / "model"] if is_best else [])
    parts: list[tuple[str, Any]] = []
    if optimizer is not None:
        parts.append((".pdopt", optimizer.state_dict()))
    parts.append((".pdparams", net.state_dict()))
    states_blob = pickle.dumps(states, protocol=2)
    for g in groups:
        g.parent.mkdir(parents=True, exist_ok=True)
        tmps: list[tuple[Path, Path]] = []
        try:
            for suffix, obj in [*parts, (".states", None)]:
                final = g.with_name(g.name + suffix)
                tmp = emergency.tmp_name(final)
                tmps.append((tmp, final))
                if obj is not None:
                    paddle.save(obj, str(tmp))     # straight to the temp file: no copy in memory
                else:
                    with open(tmp, "wb") as f:
                        f.write(states_blob)
            # all complete and durable before any rename; written first, then synced: one
            # journal commit carries all three (ext4), not one commit per file
            emergency.fsync_files([t for t, _ in tmps])
            for tmp, final in tmps:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in tmps:
                tmp.unlink(missing_ok=True)
            raise
        emergency.fsync_dir(g.parent)
    if emergency.current() is not None and exit_after_stop:
        emergency.served(emergency.current(), d / prefix, exit=True)
    return d / prefix


def load_model(checkpoints: str | None, model: Any, optimizer: Any = None) -> dict:
    """PaddleOCR's load_model for `Global.checkpoints`: loads `<prefix>.pdparams` into the
    model, `<prefix>.pdopt` into the optimizer when both exist, and returns the
    best_model_dict with `start_epoch` (= saved epoch + 1) and `global_step`. {} for None."""
    if not checkpoints:
        return {}
    prefix = Path(checkpoints)
    net = model.network if hasattr(model, "network") else model
    params = prefix.with_name(prefix.name + ".pdparams")
    if not params.exists():
        raise FileNotFoundError(f"{params} not found: Global.checkpoints must name a prefix such as "
                                f"output/latest (without .pdparams)")
    net.set_state_dict(paddle.load(str(params)))
    opt = prefix.with_name(prefix.name + ".pdopt")
    if optimizer is not None and opt.exists():
        optimizer.set_state_dict(paddle.load(str(opt)))
    st = _read_states(prefix)
    best = dict(st.get("best_model_dict") or {})
    if "epoch" in st:
        best["start_epoch"] = int(st["epoch"]) + 1
    if "global_step" in st:
        best["global_step"] = int(st["global_step"])
    log(f"resumed from {prefix} (epoch {st.get('epoch')}, step {st.get('global_step')})")
    return best


class TrainsupCallback(paddle.callbacks.Callback):
    """For paddle.Model.fit: restores the newest checkpoint at the start (Model.load), saves
    `<dir>/latest.*` at the next batch end after the save signal, and stops after a
    preemption's save (exit 0) or SIGTERM's (exit 143). `global_step` counts batches
    across restarts (fit() itself always starts at epoch 0)."""

    def __init__(self, save_dir: str | None = None, prefix: str = "latest") -> None:
        super().__init__()
        d = save_dir or os.environ.get(contract.CHECKPOINT_DIR)
        if not d:
            raise ValueError("TrainsupCallback: no save_dir (pass one or set TRAINSUP_CHECKPOINT_DIR)")
        self.save_dir = Path(d)
        self.prefix = prefix
        self.global_step = 0
        self.epoch = 0
        self.resumed_from: str | None = None
        emergency.install()

    def on_train_begin(self, logs: Any = None) -> None:
        emergency.install()
        src = resume_prefix(str(self.save_dir))
        if src:
            self.model.load(src)                       # paddle's own resume: params + optimizer
            st = _read_states(Path(src))
            self.global_step = int(st.get("global_step", 0))
            self.epoch = int(st.get("epoch", 0))
            self.resumed_from = src

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, step: int, logs: Any = None) -> None:
        self.global_step += 1
        req = emergency.take()
        if req is None:
            return
        path = save_model(self.model, self.model._optimizer, self.save_dir, self.prefix,
                          exit_after_stop=False, epoch=self.epoch, global_step=self.global_step)
        code = emergency.served(req, path)
        if code is not None:
            log(f"saved {path} for {'preemption' if code == 0 else 'SIGTERM'}; exiting {code}")
            raise SystemExit(code)
