"""A Hugging Face Trainer checkpoint: a `checkpoint-<N>/` directory. trainer_state.json is
its commit marker (the Trainer writes it last): it must parse and its global_step must be
N; every weight file (*.safetensors, *.bin, *.pt, *.pth) must be complete; a stray `.tmp*`
file means a save was killed before its rename.

Bookkeeping: the Trainer's best checkpoint (`best_model_checkpoint` in the newest
trainer_state.json, for `load_best_model_at_end`) is kept by rotation like a pinned one —
deleting it makes the Trainer silently return the last model."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from typing import Any

from ..naming import HF_DIR, counter, show_int, step_of
from ..walk import walk
from .common import Invalid, Verdict, bounded_metrics, entry_dir, open_file, read_capped, read_capped_fd
from .readers.safetensors import check_safetensors_fd
from .readers.zip import check_torch_fd

NAME = "hf"
KIND = "entry"
COMMIT_MARKER = "trainer_state.json"
DIR_RE = HF_DIR
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MAX_PROBLEMS = 5          # listed in a verdict; the rest are counted


def claims(name: str, is_dir: bool) -> bool:
    return is_dir and DIR_RE.fullmatch(name) is not None


def _parse_state(raw: bytes) -> dict:
    try:
        state = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # a 5000-digit number is a ValueError too (Python's int digit limit)
        raise ValueError(f"not valid JSON ({str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError("not valid JSON (not a JSON object)")
    return state


def check_hf(path: str) -> Verdict:
    name = os.path.basename(path)
    step = step_of(name)
    dfd = entry_dir(path, "hf", step)
    if isinstance(dfd, Verdict):
        return dfd
    problems: list[str] = []
    epoch = None
    metrics: dict = {}
    try:
        try:
            fd, st = open_file(dfd, COMMIT_MARKER)
        except Invalid as e:
            problems.append("missing trainer_state.json (commit marker: Trainer writes it last)"
                            if str(e).startswith("missing") else str(e))
        else:
            try:
                state = _parse_state(read_capped_fd(fd, st.st_size, COMMIT_MARKER, "trainer_state"))
                gs = state.get("global_step")
                if isinstance(gs, int) and not isinstance(gs, bool):
                    if counter(gs) is None:
                        problems.append(f"trainer_state.json global_step {show_int(gs)} is not a count "
                                        f"in 0..2**63-1")
                    elif step is not None and gs != step:
                        problems.append(f"trainer_state.json global_step {gs} != {step} in the dir name")
                ep = state.get("epoch")
                if isinstance(ep, (int, float)) and not isinstance(ep, bool) and math.isfinite(ep):
                    epoch = counter(int(ep))
                metrics = _hf_metrics(state)
            except Invalid as e:
                problems.append(str(e))
            except ValueError as e:
                problems.append(f"trainer_state.json: {e}")
            finally:
                os.close(fd)
        for rel, lst in walk(dfd):
            base = rel.rsplit("/", 1)[-1]
            if stat.S_ISDIR(lst.st_mode):
                continue
            if stat.S_ISLNK(lst.st_mode):
                raise Invalid(f"{rel}: a symlink (never followed)")
            if base.startswith(".tmp") or base.startswith("tmp"):
                problems.append(f"stray temp file {rel} (a save was killed before its rename)")
                continue
            if not base.endswith(WEIGHT_SUFFIXES):
                continue
            fd, st = open_file(dfd, rel)
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
        why = "; ".join(problems[:_MAX_PROBLEMS])
        if len(problems) > _MAX_PROBLEMS:
            why += f"; and {len(problems) - _MAX_PROBLEMS} more"
        return Verdict("hf", False, why, step, epoch, metrics=metrics)
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
    return bounded_metrics(out)


check = check_hf


def protected_steps(root_fd: int, infos: Sequence[Any]) -> set[int]:
    """Steps of the checkpoint HF's newest trainer_state.json names as best (read-only,
    through the job's held dir: a FIFO there is a refusal, never a wait)."""
    newest = next((i for i in reversed(infos) if i.format == NAME and i.valid), None)
    if newest is None:
        return set()
    try:
        state = _parse_state(read_capped(root_fd, f"{newest.name}/{COMMIT_MARKER}", "trainer_state"))
    except (Invalid, OSError, ValueError):
        return set()
    best = state.get("best_model_checkpoint")
    m = DIR_RE.fullmatch(os.path.basename(best.rstrip("/"))) if isinstance(best, str) else None
    s = counter(m.group(1)) if m else None
    return {s} if s is not None else set()
