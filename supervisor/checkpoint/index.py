"""The ordered view of one job's checkpoint dir: what is there, valid or why not.

`scan` lists the entries of a checkpoint dir (never recursing into unrecognised
subfolders), validates each through validate.check_entry (cached verdicts cost only lstat
calls), and orders them oldest first by step. Step: the manifest's, else the number in the
name, else mtime order: an unnumbered entry (`latest.pth`, `last.ckpt`) sorts right after
the newest numbered entry whose mtime is not later than its own.

In-progress trainsup writes (`.trainsup-tmp/step-N.<pid>/`) are listed with
in_progress=True and valid=False so rotation can protect young ones and collect stale ones.
Symlinks are never followed and never valid.
"""

from __future__ import annotations

import bisect
import errno
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from . import frameworks
from .format import TMP_DIR
from .validate import (
    FORMATS,
    VerdictCache,
    check_entry,
    detect_format,
    name_format,
    step_from_name,
)

TMP_ENTRY_RE = re.compile(r"^step-(\d{8,})\.(\d+)$")


class CheckpointDirError(OSError):
    """The checkpoint dir is missing, not a directory, a symlink, or was replaced mid-scan."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path                      # absolute; for in-progress entries, inside .trainsup-tmp/
    name: str
    format: str                     # trainsup | torch | hf
    step: Optional[int]             # None: nothing numbered it (ordered by mtime instead)
    bytes: int                      # regular files only, recursively
    valid: bool
    invalid_reason: Optional[str] = None
    reason: Optional[str] = None    # the manifest's save reason
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    created: Optional[str] = None   # the manifest's UTC timestamp
    mtime: float = 0.0              # newest mtime of the entry or anything in it (wall clock)
    epoch: Optional[int] = None
    in_progress: bool = False
    pid: Optional[int] = None       # writer pid of an in-progress entry
    cached: bool = field(default=False, compare=False)
    # Framework entries (frameworks/): the files that make up the entry, relative to the
    # checkpoint dir, deleted as one unit, commit marker first (empty: `path` is the entry);
    # alias_kind: latest | best | last | link | backup for a name the framework rewrites, and
    # alias_of: the numbered entry whose step it shares; resume: what the framework's resume
    # call takes when that is not `path` (a save_last="link" symlink's target).
    members: tuple[str, ...] = ()
    alias_kind: Optional[str] = None
    alias_of: Optional[str] = None
    resume: Optional[Path] = None

    @property
    def resume_path(self) -> Path:
        """What TRAINSUP_RESUME_FROM / {checkpoint} name: the dir (HF, trainsup), the file
        (torch, Lightning, Keras), the prefix (Paddle `latest`, TF `ckpt-N`)."""
        return self.resume or self.path


def scan(
    ckpt_dir: Union[str, os.PathLike],
    fmt: str = "auto",
    cache: Optional[VerdictCache] = None,
) -> list[CheckpointInfo]:
    """Every checkpoint-looking entry of ckpt_dir, oldest first."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")
    root = Path(os.path.abspath(ckpt_dir))
    before = _dir_identity(root)
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except FileNotFoundError:
        raise CheckpointDirError(errno.ENOENT, f"{root}: checkpoint dir vanished during scan") from None
    except NotADirectoryError:
        raise CheckpointDirError(errno.ENOTDIR, f"{root}: replaced by a non-directory") from None
    infos, claimed = frameworks.scan(root, fmt, cache, CheckpointInfo)
    for e in entries:
        if e.name in claimed:
            continue
        if e.name == TMP_DIR:
            infos.extend(_scan_tmp(root / TMP_DIR))
            continue
        if e.name.startswith("."):
            continue
        info = _scan_entry(root, e, fmt, cache)
        if info is not None:
            infos.append(info)
    if _dir_identity(root) != before:
        raise CheckpointDirError(errno.ESTALE, f"{root}: checkpoint dir was replaced during scan")
    return order(infos)


def _dir_identity(root: Path) -> tuple[int, int]:
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise CheckpointDirError(errno.ENOENT, f"{root}: checkpoint dir does not exist") from None
    except OSError as e:
        raise CheckpointDirError(e.errno, f"{root}: cannot stat checkpoint dir: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointDirError(
            errno.ELOOP, f"{root}: checkpoint dir is a symlink (never followed); configure its real path"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointDirError(errno.ENOTDIR, f"{root}: checkpoint dir is not a directory")
    return st.st_dev, st.st_ino


def _scan_entry(root: Path, e: os.DirEntry, fmt: str, cache) -> Optional[CheckpointInfo]:
    path = root / e.name
    try:
        if e.is_symlink():
            kind = name_format(e.name, fmt)
            if kind is None:
                return None
            st = os.lstat(path)
            return CheckpointInfo(path, e.name, kind, step_from_name(e.name), 0, False, "symlink",
                                  mtime=st.st_mtime)
        kind = detect_format(e.name, e.is_dir(follow_symlinks=False), fmt)
        if kind is None:
            return None
        c = check_entry(str(path), kind, cache)
    except FileNotFoundError:
        return None  # deleted between listing and checking: rotation or the user got there first
    v = c.verdict
    step = v.step if v.step is not None else step_from_name(e.name)
    return CheckpointInfo(
        path=path, name=e.name, format=kind, step=step, bytes=c.bytes, valid=v.valid,
        invalid_reason=v.invalid_reason, reason=v.reason, metrics=dict(v.metrics),
        created=v.created, mtime=c.mtime, epoch=v.epoch, cached=c.cached,
    )


def _scan_tmp(tmp: Path) -> list[CheckpointInfo]:
    out = []
    try:
        if os.path.islink(tmp):
            return out
        with os.scandir(tmp) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for e in entries:
        m = TMP_ENTRY_RE.match(e.name)
        try:
            st = e.stat(follow_symlinks=False)
            size = _tree_bytes(e) if e.is_dir(follow_symlinks=False) else st.st_size
        except FileNotFoundError:
            continue  # committed (renamed away) while we looked
        out.append(CheckpointInfo(
            path=tmp / e.name, name=e.name, format="trainsup",
            step=int(m.group(1)) if m else None, bytes=size, valid=False,
            invalid_reason="in progress", mtime=st.st_mtime, in_progress=True,
            pid=int(m.group(2)) if m else None,
        ))
    return out


def _tree_bytes(e: os.DirEntry) -> int:
    total = 0
    stack = [e.path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for c in it:
                    if c.is_dir(follow_symlinks=False):
                        stack.append(c.path)
                    elif c.is_file(follow_symlinks=False):
                        total += c.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
    return total


def order(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Oldest first: by step; an unnumbered entry right after the numbered ones older than it."""
    infos = list(infos)
    # An alias sorts before the numbered entry it shares a step with: the numbered one is
    # the latest of that step (mtimes of copies say nothing).
    numbered = sorted((i for i in infos if i.step is not None),
                      key=lambda i: (i.step, i.alias_kind is None, i.mtime, i.name))
    unnumbered = [i for i in infos if i.step is None]
    if not unnumbered:
        return numbered
    by_mtime = sorted(numbered, key=lambda i: i.mtime)
    keyed = [((i.step, 0, i.alias_kind is None, i.mtime, i.name), i) for i in numbered]
    # the largest step among numbered entries not newer than each unnumbered entry
    mtimes = [i.mtime for i in by_mtime]
    running_max: list[float] = []
    best = -math.inf
    for i in by_mtime:
        best = max(best, i.step)
        running_max.append(best)
    for u in unnumbered:
        k = bisect.bisect_right(mtimes, u.mtime)
        anchor = running_max[k - 1] if k else -math.inf
        if u.alias_kind is not None:
            anchor = -math.inf  # a framework's copy whose step no byte tells (best_model/model)
        keyed.append(((anchor, 1, True, u.mtime, u.name), u))
    keyed.sort(key=lambda t: t[0])
    return [i for _, i in keyed]


def latest_valid(infos: Sequence[CheckpointInfo]) -> Optional[CheckpointInfo]:
    for i in reversed(infos):
        if i.valid and not i.in_progress:
            return i
    return None


def metric_value(info: CheckpointInfo, metric: str) -> Optional[float]:
    v = info.metrics.get(metric) if info.metrics else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def best(infos: Sequence[CheckpointInfo], metric: str, mode: str = "min") -> Optional[CheckpointInfo]:
    """The valid checkpoint with the best `metric`; ties go to the newest."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode {mode!r} is not min or max")
    sign = 1.0 if mode == "min" else -1.0
    found = None
    found_key = None
    for pos, i in enumerate(infos):
        v = metric_value(i, metric) if i.valid else None
        if v is None:
            continue
        key = (sign * v, -pos)
        if found_key is None or key < found_key:
            found, found_key = i, key
    return found
