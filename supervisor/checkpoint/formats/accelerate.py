"""Hugging Face Accelerate `save_state()`: a folder per save. With
`ProjectConfiguration(automatic_checkpoint_naming=True)` it is
`<project_dir>/checkpoints/checkpoint_<N>`, N counting saves (so the step shown is N).

What a save writes, in order, none of it atomically: the model weights
(`model.safetensors`, or `pytorch_model.bin`; a `*_fsdp_*` DCP folder under FSDP), then
`optimizer.bin`, `scheduler.bin`, `sampler.bin`, the scaler, `random_states_<rank>.pkl` (every
process its own), and last the objects registered with `register_for_checkpointing`
(`custom_checkpoint_<i>.pkl`). There is no commit marker, so what is checked is: every file
complete (safetensors header and extent, torch zips with their CRCs, a nested DCP folder as
formats/dcp.py checks it), `random_states_0.pkl` present (the main process's last accelerator
file), and every `custom_checkpoint_<i>.pkl` and accelerator file the previous save in the
same folder has (a save killed before its registered objects lacks them: load_state would
raise on the count).

Rotation deletes through the checkpoint dir's own trash, never one inside `checkpoints/`:
Accelerate's `total_limit` pruning parses a number out of every name in that folder.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .common import Invalid, Verdict
from .dcp import COMMIT_MARKER as DCP_MARKER
from .dcp import _check_folder as check_dcp_folder
from .group import DIR, FILE, Group, Listing, Looking, Opened, join, list_dir, open_dir_under
from .readers.safetensors import check_safetensors_fd
from .readers.zip import check_torch_fd

NAME = "accelerate"
KIND = "group"
AUTO_CLAIMS_ALL = True           # a folder is Accelerate's only by its files
TRASH_AT_ROOT = True
_MARKS = re.compile(r"^(?:random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|optimizer(?:_\d+)?\.bin)$")
_RNG0 = "random_states_0.pkl"
# what every save of the same script writes (rank files apart: the world size may change)
_SAME_EVERY_SAVE = re.compile(r"^(?:custom_checkpoint_\d+\.pkl|(?:optimizer|scheduler|sampler)(?:_\d+)?\.bin"
                              r"|scaler\.pt|model(?:_\d+)?\.safetensors|pytorch_model(?:_\d+)?\.bin)$")
_STEP_RE = re.compile(r"(\d+)$")
_OTHERS = ("trainer_state.json", "MANIFEST.json")   # HF Trainer's and trainsup's own folders


def is_accelerate_listing(listing: Listing) -> bool:
    if any(listing.get(n) == FILE for n in _OTHERS):
        return False
    return any(k == FILE and _MARKS.match(n) for n, k in listing.items())


def recognise(where: Looking) -> list[Group]:
    out = []
    for name, kind in sorted(where.listing.items()):
        if kind != DIR or name.startswith("."):
            continue
        rel = join(where.dir, name)
        if is_accelerate_listing(where.listing_of(rel)):
            out.append(Group(rel, NAME, (rel,), resume=rel))
    return out


def step_of(base: str) -> int | None:
    m = _STEP_RE.search(base)
    return int(m.group(1)) if m else None


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    step = step_of(g.name.rsplit("/", 1)[-1])
    try:
        _check_files(root_fd, g.name)
    except Invalid as e:
        return Verdict(NAME, False, str(e), step)
    return Verdict(NAME, True, None, step)


def _names(root_fd: int, d: str) -> Listing:
    fd = open_dir_under(root_fd, d)
    try:
        return list_dir(fd)
    finally:
        os.close(fd)


def _check_files(root_fd: int, d: str) -> None:
    names = _names(root_fd, d)
    for n, k in sorted(names.items()):
        rel = f"{d}/{n}"
        if k == DIR:
            sub = _names(root_fd, rel)
            if DCP_MARKER in sub or any(x.endswith(".distcp") for x in sub):
                try:
                    check_dcp_folder(root_fd, rel)
                except Invalid as e:
                    raise Invalid(f"{n}/: {e}") from None
            continue
        if k != FILE or not n.endswith((".safetensors", ".bin", ".pkl", ".pt", ".pth")):
            continue
        with Opened(root_fd, rel) as (fd, st):
            try:
                if n.endswith(".safetensors"):
                    check_safetensors_fd(fd, st.st_size)
                else:
                    check_torch_fd(fd, st.st_size)
            except Invalid as e:
                raise Invalid(f"{n}: {e}") from None
    if names.get(_RNG0) != FILE:
        raise Invalid(f"missing {_RNG0} (save_state writes it after the model, optimizer and scheduler)")


def finish(tree: Any, groups: list[Group], verdicts: dict[str, Verdict]) -> None:
    """A save lacking a file the previous save in its folder has was cut short."""
    by_dir: dict[str, list[Group]] = {}
    for g in groups:
        by_dir.setdefault(g.dir, []).append(g)
    for gs in by_dir.values():
        gs.sort(key=lambda g: (verdicts[g.name].step if verdicts[g.name].step is not None else -1, g.name))
        prev: set[str] | None = None
        for g in gs:
            v = verdicts[g.name]
            mine = {n for n in tree.listing(g.name) if _SAME_EVERY_SAVE.match(n)}
            if v.valid and prev is not None and (missing := sorted(prev - mine)):
                verdicts[g.name] = Verdict(NAME, False, f"missing {', '.join(missing)} that the save before it has "
                                                        f"(save_state killed before it wrote them)", v.step, v.epoch)
            elif v.valid:
                prev = mine
