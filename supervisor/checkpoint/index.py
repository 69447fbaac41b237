"""The ordered view of one job's checkpoint dir: what is there, valid or why not.

`scan` lists the entries of a checkpoint dir through its held DirHandle (never by path
after the dir was resolved; never recursing into unmanaged entries), validates each
managed one through validate.check_entry (cached verdicts cost only lstat calls), and
orders them oldest first by step. Step: the manifest's, else the number in the name, else
mtime order: an unnumbered alias (`latest.pth`, `last.ckpt`) sorts right after the newest
numbered entry whose mtime is not later than its own.

What each entry is, for rotation:
  managed=False  a name the format does not claim (naming.py): listed, never deleted;
  unknown=True   could not be read (EACCES, EIO, EMFILE), or a format we cannot prove
                 either way (legacy torch pickles): never "invalid", never deleted;
  in_progress    a trainsup tmp dir `.trainsup-tmp/step-N.<pid>`;
  fp             an lstat digest of every file, so the daemon can see a write land by
                 its own monotonic clock (liveness.py), whatever the wall clock says.
Symlinks are never followed and never valid.
"""

from __future__ import annotations

import bisect
import errno
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import formats
from .dirhandle import CheckpointDirError as _HandleError
from .dirhandle import DirHandle
from .format import TMP_DIR
from .formats import groups
from .formats.common import VerdictCache
from .naming import is_alias
from .trash import ASIDE_DIR, TRASH_DIR
from .validate import check_entry, detect_format, fingerprint, name_format, step_from_name

TMP_ENTRY_RE = re.compile(r"step-(\d{8,})\.(\d+)")     # fullmatch only
# Verdicts that say "could not look", not "looked and it is broken".
_UNKNOWN_MARKERS = ("unreadable:", "unsupported")


class CheckpointDirError(OSError):
    """The checkpoint dir is missing, not a directory, a symlink, or was replaced mid-scan."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path                      # absolute; for in-progress entries, inside .trainsup-tmp/
    name: str
    format: str                     # trainsup | torch | hf | unmanaged
    step: int | None             # None: nothing numbered it (ordered by mtime instead)
    bytes: int                      # regular files only, recursively (unmanaged: top entry only)
    valid: bool
    invalid_reason: str | None = None
    reason: str | None = None    # the manifest's save reason
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    created: str | None = None   # the manifest's UTC timestamp
    save_s: float | None = None  # the manifest's: how long the save held training up
    mtime: float = 0.0              # newest mtime of the entry or anything in it (wall clock)
    epoch: int | None = None
    in_progress: bool = False
    pid: int | None = None       # writer pid of an in-progress entry
    cached: bool = field(default=False, compare=False)
    managed: bool = True            # the format names it a checkpoint (else never deleted)
    unknown: bool = False           # unreadable / unprovable: never deleted
    alias: bool = False             # an unnumbered "newest" name (last.ckpt, latest.pth)
    fp: str = field(default="", compare=False)
    ino: int = 0
    # Group-format entries (formats/groups.py): the files that make up the entry, relative to the
    # checkpoint dir, deleted as one unit, commit marker first (empty: `path` is the entry);
    # alias_kind: latest | best | last | link | backup for a name the framework rewrites, and
    # alias_of: the numbered entry whose step it shares; resume: what the framework's resume
    # call takes when that is not `path` (a save_last="link" symlink's target).
    members: tuple[str, ...] = ()
    alias_kind: str | None = None
    alias_of: str | None = None
    resume: Path | None = None

    @property
    def resume_path(self) -> Path:
        """What TRAINSUP_RESUME_FROM / {checkpoint} name: the dir (HF, trainsup), the file
        (torch, Lightning, Keras), the prefix (Paddle `latest`, TF `ckpt-N`)."""
        return self.resume or self.path


def is_unknown_reason(reason: str | None) -> bool:
    return reason is not None and any(m in reason for m in _UNKNOWN_MARKERS)


def scan(
    ckpt_dir: str | os.PathLike | DirHandle,
    fmt: str = "auto",
    cache: VerdictCache | None = None,
    pattern: re.Pattern | None = None,
) -> list[CheckpointInfo]:
    """Every entry of the checkpoint dir, oldest first (managed ones ordered; unmanaged
    ones listed first, by name)."""
    if fmt not in formats.CHOICES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(formats.CHOICES)}")
    if isinstance(ckpt_dir, DirHandle):
        return _scan_held(ckpt_dir, fmt, cache, pattern)
    root = Path(os.path.abspath(ckpt_dir))
    try:
        h = DirHandle.open(root)
    except _HandleError as e:
        if e.errno == errno.ENOENT:
            raise CheckpointDirError(errno.ENOENT, f"{root}: checkpoint dir does not exist") from None
        raise CheckpointDirError(e.errno, f"{e.strerror} (never followed); configure its real path") from None
    except NotADirectoryError:
        raise CheckpointDirError(errno.ENOTDIR, f"{root}: checkpoint dir is not a directory") from None
    with h:
        return _scan_held(h, fmt, cache, pattern)


def _scan_held(h: DirHandle, fmt: str, cache, pattern) -> list[CheckpointInfo]:
    io = h.io_root
    try:
        # held dir fd: the checkpoint dir's top level (names and lstat only)
        with os.scandir(h.fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it]
    except OSError as e:
        raise CheckpointDirError(e.errno, f"{h.path}: cannot list the checkpoint dir: {e.strerror}") from None
    # Group formats (Paddle prefix groups, TF index + shards, Keras, Lightning,
    # safetensors) first: the names they claim are one entry each, not loose files.
    fw_infos, claimed = groups.scan(h.path, fmt, cache, CheckpointInfo, root_fd=h.fd)
    infos: list[CheckpointInfo] = list(fw_infos)
    for name, is_dir, is_link in entries:
        if name in claimed:
            continue
        if name == TMP_DIR:
            infos.extend(_scan_tmp(h))
            continue
        if name in (TRASH_DIR, ASIDE_DIR):
            continue       # the daemon's own: the trash, and saves moved aside (custody lists those)
        info = _scan_entry(h, io, name, is_dir, is_link, fmt, cache, pattern)
        if info is not None:
            infos.append(info)
    unmanaged = sorted((i for i in infos if not i.managed), key=lambda i: i.name)
    return unmanaged + order(i for i in infos if i.managed)


def _unmanaged(h: DirHandle, name: str) -> CheckpointInfo | None:
    try:
        st = os.stat(name, dir_fd=h.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError:
        st = None
    return CheckpointInfo(
        path=h.path / name, name=name, format="unmanaged", step=None,
        bytes=st.st_size if st is not None and stat.S_ISREG(st.st_mode) else 0,
        valid=False, invalid_reason="unmanaged: not a checkpoint name of this job's format",
        mtime=st.st_mtime if st is not None else 0.0, managed=False,
        ino=st.st_ino if st is not None else 0)


def _scan_entry(h: DirHandle, io: str, name: str, is_dir: bool, is_link: bool, fmt: str, cache,
                pattern) -> CheckpointInfo | None:
    path = h.path / name
    if is_link:
        kind = name_format(name, fmt, pattern)
        if kind is None:
            return _unmanaged(h, name)
        try:
            st = os.stat(name, dir_fd=h.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return CheckpointInfo(path, name, kind, step_from_name(name), 0, False, "symlink",
                              mtime=st.st_mtime, alias=is_alias(name), ino=st.st_ino)
    kind = detect_format(name, is_dir, fmt, pattern)
    if kind is None:
        return _unmanaged(h, name)
    try:
        c = check_entry(f"{io}/{name}", kind, cache, key_path=str(path))
        ino = os.stat(name, dir_fd=h.fd, follow_symlinks=False).st_ino
    except FileNotFoundError:
        return None  # deleted between listing and checking: rotation or the user got there first
    except OSError as e:
        # EACCES on a root-squashed mount, EIO, EMFILE: we could not look, so we know nothing
        return CheckpointInfo(path, name, kind, step_from_name(name), 0, False,
                              f"unreadable: {e.strerror or e}", unknown=True, alias=is_alias(name))
    v = c.verdict
    step = v.step if v.step is not None else step_from_name(name)
    return CheckpointInfo(
        path=path, name=name, format=kind, step=step, bytes=c.bytes, valid=v.valid,
        invalid_reason=v.invalid_reason, reason=v.reason, metrics=dict(v.metrics),
        created=v.created, save_s=v.save_s, mtime=c.mtime, epoch=v.epoch, cached=c.cached,
        unknown=not v.valid and is_unknown_reason(v.invalid_reason), alias=is_alias(name),
        fp=c.fingerprint, ino=ino,
    )


def _scan_tmp(h: DirHandle) -> list[CheckpointInfo]:
    out: list[CheckpointInfo] = []
    try:
        tfd = h.open_beneath(TMP_DIR)
    except OSError:
        return out      # missing, a symlink, a mount: nothing of ours in progress there
    try:
        # held dir fd: .trainsup-tmp, opened beneath the held dir
        with os.scandir(tfd) as it:
            names = [e.name for e in it]
    finally:
        os.close(tfd)
    tmp_io = f"{h.io_root}/{TMP_DIR}"
    for name in names:
        m = TMP_ENTRY_RE.fullmatch(name)
        try:
            fp, size, newest = fingerprint(f"{tmp_io}/{name}")
        except FileNotFoundError:
            continue  # committed (renamed away) while we looked
        except OSError as e:
            out.append(CheckpointInfo(h.path / TMP_DIR / name, name, "trainsup", None, 0, False,
                                      f"unreadable: {e.strerror}", in_progress=True, unknown=True))
            continue
        out.append(CheckpointInfo(
            path=h.path / TMP_DIR / name, name=name, format="trainsup",
            step=int(m.group(1)) if m else None, bytes=size, valid=False,
            invalid_reason="in progress", mtime=newest, in_progress=True,
            pid=int(m.group(2)) if m else None, fp=fp,
        ))
    return out


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
    keyed: list[tuple[tuple[float, int, bool, float, str], CheckpointInfo]] = [
        ((float(i.step or 0), 0, i.alias_kind is None, i.mtime, i.name), i) for i in numbered]
    # the largest step among numbered entries not newer than each unnumbered entry
    mtimes = [i.mtime for i in by_mtime]
    running_max: list[float] = []
    best = -math.inf
    for i in by_mtime:
        best = max(best, float(i.step or 0))
        running_max.append(best)
    for u in unnumbered:
        k = bisect.bisect_right(mtimes, u.mtime)
        anchor = running_max[k - 1] if k else -math.inf
        if u.alias_kind is not None:
            anchor = -math.inf  # a framework's copy whose step no byte tells (best_model/model)
        keyed.append(((anchor, 1, True, u.mtime, u.name), u))
    keyed.sort(key=lambda t: t[0])
    return [i for _, i in keyed]


def latest_valid(infos: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
    for i in reversed(infos):
        if i.valid and not i.in_progress:
            return i
    return None


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    v = info.metrics.get(metric) if info.metrics else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def best(infos: Sequence[CheckpointInfo], metric: str, mode: str = "min") -> CheckpointInfo | None:
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
