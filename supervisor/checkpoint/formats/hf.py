"""A Hugging Face Trainer checkpoint: a `checkpoint-<N>/` directory. trainer_state.json is
its commit marker (the Trainer writes it last): it must parse and its global_step must be
N; every weight file (*.safetensors, *.bin, *.pt, *.pth) must be complete; a stray `.tmp*`
file means a save was killed before its rename.

Bookkeeping: the Trainer's best checkpoint (`best_model_checkpoint` in the newest
trainer_state.json, for `load_best_model_at_end`) is kept by rotation like a pinned one —
deleting it makes the Trainer silently return the last model."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..naming import HF_DIR, step_of
from .common import NOFOLLOW_DIR, NOFOLLOW_FILE, Invalid, Verdict, open_entry_dir, open_regular, pread_exact
from .readers.safetensors import check_safetensors_fd
from .readers.zip import check_torch_fd

NAME = "hf"
KIND = "entry"
COMMIT_MARKER = "trainer_state.json"
DIR_RE = HF_DIR
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MAX_STATE = 16 << 20


def claims(name: str, is_dir: bool) -> bool:
    return is_dir and DIR_RE.fullmatch(name) is not None


def check_hf(path: str) -> Verdict:
    name = os.path.basename(path)
    step = step_of(name)
    dfd = open_entry_dir(path, "hf", step)
    if isinstance(dfd, Verdict):
        return dfd
    problems: list[str] = []
    epoch = None
    metrics: dict = {}
    try:
        try:
            fd, st = open_regular(dfd, "trainer_state.json")
        except Invalid as e:
            problems.append("missing trainer_state.json (commit marker: Trainer writes it last)"
                            if str(e).startswith("missing") else str(e))
        else:
            try:
                state = json.loads(pread_exact(fd, st.st_size, 0) if st.st_size else b"")
                if not isinstance(state, dict):
                    raise ValueError("not a JSON object")
                gs = state.get("global_step")
                if isinstance(gs, int) and step is not None and gs != step:
                    problems.append(f"trainer_state.json global_step {gs} != {step} in the dir name")
                if isinstance(state.get("epoch"), (int, float)):
                    epoch = int(state["epoch"])
                metrics = _hf_metrics(state)
            except (ValueError, UnicodeDecodeError) as e:
                problems.append(f"trainer_state.json: not valid JSON ({e})")
            finally:
                os.close(fd)
        for rel in _walk_files(dfd):
            base = rel.rsplit("/", 1)[-1]
            if base.startswith(".tmp") or base.startswith("tmp"):
                problems.append(f"stray temp file {rel} (a save was killed before its rename)")
                continue
            if not base.endswith(WEIGHT_SUFFIXES):
                continue
            fd, st = open_regular(dfd, rel)
            try:
                if base.endswith(".safetensors"):
                    check_safetensors_fd(fd, st.st_size)
                else:
                    check_torch_fd(fd, st.st_size)
            except Invalid as e:
                problems.append(f"{rel}: {e}")
            finally:
                os.close(fd)
    except Invalid as e:
        problems.append(str(e))
    finally:
        os.close(dfd)
    if problems:
        return Verdict("hf", False, "; ".join(problems), step, epoch, metrics=metrics)
    return Verdict("hf", True, None, step, epoch, metrics=metrics)


def _hf_metrics(state: dict) -> dict:
    """Numbers logged at the checkpoint's step (eval_loss etc.), newest wins."""
    out: dict = {}
    gs = state.get("global_step")
    for rec in state.get("log_history") or ():
        if isinstance(rec, dict) and rec.get("step") == gs:
            out.update({k: v for k, v in rec.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
    if isinstance(state.get("best_metric"), (int, float)):
        out.setdefault("best_metric", state["best_metric"])
    return out


def _walk_files(dfd: int, prefix: str = "") -> list[str]:
    out = []
    with os.scandir(dfd) as it:
        entries = list(it)
    for e in entries:
        rel = f"{prefix}{e.name}"
        if e.is_symlink():
            raise Invalid(f"{rel}: a symlink (never followed)")
        if e.is_dir(follow_symlinks=False):
            sub = os.open(e.name, NOFOLLOW_DIR, dir_fd=dfd)
            try:
                out.extend(_walk_files(sub, rel + "/"))
            finally:
                os.close(sub)
        else:
            out.append(rel)
    return out


check = check_hf


def protected_steps(infos: Sequence[Any]) -> set[int]:
    """Steps of the checkpoint HF's newest trainer_state.json names as best (read-only)."""
    newest = next((i for i in reversed(infos) if i.format == NAME and i.valid), None)
    if newest is None:
        return set()
    try:
        fd = os.open(Path(newest.path) / COMMIT_MARKER, NOFOLLOW_FILE)
    except OSError:
        return set()
    try:
        state = json.loads(os.read(fd, _MAX_STATE))
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    finally:
        os.close(fd)
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    m = DIR_RE.fullmatch(os.path.basename(str(best).rstrip("/"))) if isinstance(best, str) else None
    return {int(m.group(1))} if m else set()
