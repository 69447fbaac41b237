"""The checkpoint formats trainsup recognises and validates: one module per format, one
table (as gunicorn keeps its workers and uvicorn its protocols). Adding a format is a new
module here and one line in FORMATS.

Every format module has:
  NAME          what `checkpoint.format` calls it
  KIND          "entry": one name in the checkpoint dir is one checkpoint (a dir or a file),
                checked by path;
                "group": a checkpoint is several files, or files in a folder of their own,
                found by groups.py and checked as one unit
  entry kind:   claims(name, is_dir) -> bool      whether `auto` (or the format) takes the name
                check(path) -> Verdict
  group kind:   recognise(Looking) -> [Group]     its checkpoints in one dir
                check(root_fd, group, listing) -> Verdict
and, where they apply (hooks; absent means "nothing to do"):
  COMMIT_MARKER           the file written last (documentation, and the fixture test)
  protected_steps(root_fd, infos)  what rotation must keep for the framework's own
                          bookkeeping, whatever the quota: steps (int), or entries by
                          absolute path (Path) where the framework names files
                          (Lightning's best_model_path); read through the job's held
                          dir, off the loop
  kept_by_framework(root_fd, infos)  entries (Path) the framework's own retention counts
                          on (Lightning's best k): kept above keep_last, below a quota
  before_delete(dir_fd, base)   bookkeeping to update before an entry's files go
  after_restore(dir_fd, base)   bookkeeping the framework's own resume reads, written once
                          an entry restored from the object store is in place (TF's state
                          file, when the dir has none)
  tidy(dir_fd) -> [names] bookkeeping to repair at every rotation pass, in each dir that
                          holds entries of the format (TF's state file re-listing what
                          was deleted); off the loop
  group scan hooks:       skips_dir(name), extra_dirs(listing_of, root), STEM_SUFFIXES,
                          AUTO_CLAIMS_ALL, auto_claims(tree, g), cache_key(g, listing),
                          finish(tree, groups, verdicts), also_claims(g), alias_rank(name)
Shared readers (zip, safetensors, pickle opcode streams, HDF5, ranges) are in readers/.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from . import accelerate, dcp, deepspeed, hf, keras, lightning, orbax, paddle, safetensors, tf, torch, trainsup

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (
    trainsup,
    torch,
    hf,
    paddle,
    tf,
    keras,
    lightning,
    safetensors,
    dcp,
    deepspeed,
    accelerate,
    orbax,
)}
NAMES = tuple(FORMATS)
CHOICES = ("auto", *NAMES)                     # checkpoint.format's values
ENTRY = tuple(n for n, m in FORMATS.items() if m.KIND == "entry")
GROUP = tuple(n for n, m in FORMATS.items() if m.KIND == "group")


def hook(module: ModuleType | None, name: str, default: Any) -> Any:
    """A format's optional hook or constant, else `default`."""
    return getattr(module, name, default) if module is not None else default


def protected_steps(root_fd: int, infos: Sequence[Any]) -> set[Any]:
    """Steps and entry paths every format's bookkeeping needs kept whatever the quota (HF's
    best checkpoint, Lightning's best_model_path...), read below the job's held dir fd.
    Blocking: called on the job's own work queue, never the loop."""
    return _union(root_fd, infos, "protected_steps")


def kept_by_framework(root_fd: int, infos: Sequence[Any]) -> set[Any]:
    """Entry paths a framework's own retention still counts on (Lightning's best k): kept
    by rotation, given up under quota before keep_last. Blocking, like protected_steps."""
    return _union(root_fd, infos, "kept_by_framework")


def bookkeeping(root_fd: int, infos: Sequence[Any]) -> tuple[set[Any], set[Any]]:
    """(protected_steps, kept_by_framework): one call on the job's queue per pass."""
    return protected_steps(root_fd, infos), kept_by_framework(root_fd, infos)


def _union(root_fd: int, infos: Sequence[Any], name: str) -> set[Any]:
    out: set[Any] = set()
    for m in FORMATS.values():
        fn = hook(m, name, None)
        if fn is not None:
            out |= fn(root_fd, infos)
    return out


def managed_format(name: str, is_dir: bool, fmt: str = "auto",
                   pattern: re.Pattern | None = None) -> str | None:
    """The entry format a managed name is checked with, or None when the name is unmanaged
    (naming.py says which names are managed and why)."""
    if name.startswith(".") or "\0" in name:
        return None
    for n in ENTRY:
        if fmt in ("auto", n) and FORMATS[n].claims(name, is_dir):
            return n
    if pattern is not None and pattern.fullmatch(name):
        # checkpoint.pattern names more entries of the job's own format
        if is_dir:
            return hf.NAME if fmt == hf.NAME or (fmt == "auto" and hf.claims(name, True)) else trainsup.NAME
        return torch.NAME
    return None
