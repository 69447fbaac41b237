"""Interrupted saves moved aside before a relaunch.

A framework picks its own "latest" (HF's get_last_checkpoint, Paddle's `latest` prefix,
Keras' backup): an entry a killed save left half-written, newer than every valid one, would
be picked and crash the job again and again. Once the writer is gone (the job has no
process), such an entry is renamed into `<dir>/.trainsup-aside/` — renamed, never deleted:
the bytes stay, `trainsup checkpoints` lists it with why, and the framework no longer sees
it. Only entries proven broken qualify: never one that could not be read (`unknown`), never
a save still in progress, never an alias the framework rewrites — except one its format
names (`broken_alias_aside`): Keras' BackupAndRestore loads its backup at every start
and crashes on one its in-place write left broken, however old it is.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import replace

from ..printable import printable
from . import formats
from .dirhandle import DirHandle
from .index import CheckpointInfo
from .trash import ASIDE_DIR, open_own_dir

log = logging.getLogger("trainsup.checkpoint")
MOVED_REASON = "interrupted save, moved aside before a relaunch"


class AsideUnavailable(OSError):
    """The aside dir cannot be used (a planted symlink): a warning, never a failed launch."""


def interrupted(infos: list[CheckpointInfo], pinned: Iterable[int] = ()) -> list[CheckpointInfo]:
    """Proven-invalid managed entries newer than the newest valid one (all of them when
    nothing is valid), in index order. Not trainsup's own format (the daemon names the
    resume point itself; nothing picks a "latest" behind its back), not a pinned step."""
    pins = set(pinned)
    managed = [i for i in infos if i.managed and not i.in_progress]
    newest_valid = max((pos for pos, i in enumerate(managed) if i.valid), default=-1)
    return [i for pos, i in enumerate(managed)
            if not i.valid and not i.unknown and i.invalid_reason != "symlink" and i.format != "trainsup"
            and (i.step is None or i.step not in pins)
            and (pos > newest_valid and not i.alias and not i.alias_kind or _loaded_at_start(i))]


def _loaded_at_start(i: CheckpointInfo) -> bool:
    """A broken alias the framework loads by itself at every start (the format says)."""
    fn = formats.hook(formats.FORMATS.get(i.format), "broken_alias_aside", None)
    return bool(i.alias_kind and fn is not None and fn(i))


def _units(info: CheckpointInfo) -> list[str]:
    return list(info.members) if info.members else [info.name]


def move_aside(h: DirHandle, entries: Iterable[CheckpointInfo]) -> list[tuple[CheckpointInfo, str]]:
    """Rename each entry (every member of a framework entry) into ASIDE_DIR beneath the held
    dir. Returns (entry, its name there) for each moved; entries that vanished are skipped."""
    moved: list[tuple[CheckpointInfo, str]] = []
    try:
        afd = open_own_dir(h, ASIDE_DIR)       # the job's user can read, recover, delete
    except OSError as e:
        # A symlink (or file) planted under the name: never followed, never replaced.
        what = "a symlink, never followed" if e.errno == errno.ELOOP else f"unusable ({e.strerror})"
        raise AsideUnavailable(e.errno, f"{ASIDE_DIR} in the checkpoint dir is {what}: interrupted "
                                        "saves are not moved aside (remove it)") from None
    try:
        # held dir fd: the aside dir, opened beneath the job's held dir
        taken = set(os.listdir(afd))
        for info in entries:
            done = []
            for rel in _units(info):
                parent, _, base = rel.rpartition("/")
                flat = _flat_name(rel)
                target, n = flat, 1
                while target in taken:
                    n += 1
                    target = f"{flat}.{n}"
                try:
                    pfd = h.open_beneath(parent) if parent else os.dup(h.fd)
                    try:
                        os.rename(base, target, src_dir_fd=pfd, dst_dir_fd=afd)
                    finally:
                        os.close(pfd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    # one entry that cannot move (a link on its way, EXDEV...) stays where
                    # it is; it never stops the launch or the other entries
                    log.warning("cannot move %s aside: %s", printable(rel), e.strerror or e)
                    continue
                taken.add(target)
                done.append(target)
            if done:
                moved.append((info, done[0]))
        os.fsync(afd)
        os.fsync(h.fd)
    finally:
        os.close(afd)
    return moved


def _flat_name(rel: str) -> str:
    """`a/b` -> `a__b`, short enough to take a `.N` suffix within NAME_MAX (a nested
    250-byte name would not)."""
    flat = rel.replace("/", "__")
    raw = os.fsencode(flat)
    if len(raw) <= 240:
        return flat
    return os.fsdecode(raw[:200]) + "~" + hashlib.sha256(raw).hexdigest()[:16]


def listed(h: DirHandle) -> list[CheckpointInfo]:
    """What was moved aside, for `trainsup checkpoints`: never valid, never rotated."""
    try:
        afd = h.open_beneath(ASIDE_DIR)
    except OSError:
        return []
    out = []
    try:
        # held dir fd: the aside dir, opened beneath the job's held dir
        with os.scandir(afd) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append(CheckpointInfo(
                    path=h.path / ASIDE_DIR / e.name, name=f"{ASIDE_DIR}/{e.name}", format="aside",
                    step=None, bytes=st.st_size if e.is_file(follow_symlinks=False) else 0, valid=False,
                    invalid_reason=MOVED_REASON, mtime=st.st_mtime, managed=False, ino=st.st_ino))
    finally:
        os.close(afd)
    return sorted(out, key=lambda i: i.name)


def with_reason(info: CheckpointInfo) -> CheckpointInfo:
    return replace(info, invalid_reason=f"{MOVED_REASON}: {info.invalid_reason}")
