"""Carrying out a rotation plan truthfully, and backing off when deletion keeps failing.

Found once: a `deleted` event was written before the deletion (and stayed after it
failed), and a persistent failure (read-only mount, `chattr +i`, EBUSY, a name the trash
could not take) re-planned and re-failed with no delay: 88% CPU, ~530 events/s. Here:
  - `delete_one` returns an Outcome only after trash.delete_entry returned (the name is
    gone) or failed; the caller records `delete-intent` before and `deleted` /
    `delete-failed` after, so history shows intent and outcome apart;
  - `DeletionBackoff` holds each failing entry out of plans (rotation's `undeletable`,
    still counted in the job's bytes, so over-quota shows) for 1 s, 2 s, 4 s... up to
    10 min, and says to report a failure once per streak, not once per pass;
  - `PassGate` makes sure no rotation pass starts within `min_interval` (1 s) of the last
    one, whatever woke it. All timing is monotonic.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import formats
from .dirhandle import DirHandle
from .format import TMP_DIR
from .index import CheckpointInfo
from .trash import DeleteError, delete_entry, delete_nested


@dataclass(frozen=True)
class Outcome:
    info: CheckpointInfo
    ok: bool                        # the name is gone (deleted now, or already gone)
    already_gone: bool = False
    error: str | None = None
    errno: int = 0


def rel_name(info: CheckpointInfo) -> str:
    return f"{TMP_DIR}/{info.name}" if info.in_progress else info.name


def deletion_units(info: Any, ckpt_dir: Path) -> list[str]:
    """Paths relative to the checkpoint dir to delete, in order, for one entry: a
    multi-file entry member by member, commit marker first (the format lists it first), so
    a deletion cut short leaves an entry that reads as invalid, never one that looks
    complete with files missing."""
    members = getattr(info, "members", ())
    if members:
        return list(members)
    p = Path(info.path)
    return [p.relative_to(ckpt_dir).as_posix() if p.is_relative_to(ckpt_dir) else info.name]


def delete_unit(ckpt_dir: Path, rel: str) -> None:
    """Delete one member through the trash, by path. A member in a framework's nested layout
    (lightning_logs/version_N/checkpoints/, best_model/, a Keras subdir) is deleted with its
    own dir as the root, reached without a symlink in any component."""
    parent, _, base = rel.rpartition("/")
    d = Path(ckpt_dir)
    for comp in parent.split("/") if parent else ():
        d = d / comp
        if not stat.S_ISDIR(os.lstat(d).st_mode):
            raise DeleteError(errno.ELOOP, f"{d}: not a real directory (never followed)")
    delete_entry(d, base)


def _delete_members(h: DirHandle, info: CheckpointInfo) -> None:
    """A framework entry of several files (Paddle prefix group, TF index + shards, nested
    Lightning/Keras layouts): the format's bookkeeping first (TF's state file must never
    list a deleted checkpoint), then every member, commit marker first — each through a
    dir fd opened beneath the held dir (no symlink, no mount crossing on the way)."""
    units = deletion_units(info, h.path)
    parents = {rel.rpartition("/")[0] for rel in units}
    hook = getattr(formats.FORMATS.get(info.format), "before_delete", None)
    if hook is not None:
        parent = info.name.rpartition("/")[0]
        dfd = h.open_beneath(parent) if parent else os.dup(h.fd)
        try:
            hook(dfd, info.name.rpartition("/")[2])
        finally:
            os.close(dfd)
    subs: dict[str, DirHandle] = {}
    # a framework that lists the folder its saves sit in must never see our trash there
    root_trash = bool(getattr(formats.FORMATS.get(info.format), "TRASH_AT_ROOT", False))
    try:
        for parent in parents:
            if parent and not root_trash:
                subs[parent] = DirHandle(h.path / parent, h.open_beneath(parent))
        for rel in units:
            parent, _, base = rel.rpartition("/")
            try:
                if parent and root_trash:
                    delete_nested(h, parent, base)
                else:
                    delete_entry(subs[parent] if parent else h, base)
            except FileNotFoundError:
                continue       # one member already gone: the others still go
    finally:
        for s in subs.values():
            s.close()


def delete_one(h: DirHandle, info: CheckpointInfo) -> Outcome:
    """Delete one planned entry through the held dir; never raises for the entry's sake."""
    try:
        if info.members and not info.in_progress:
            _delete_members(h, info)
        else:
            delete_entry(h, rel_name(info))
    except FileNotFoundError:
        return Outcome(info, True, already_gone=True)
    except (DeleteError, OSError, ValueError) as e:
        return Outcome(info, False, error=str(getattr(e, "strerror", None) or e),
                       errno=getattr(e, "errno", 0) or errno.EIO)
    return Outcome(info, True)


@dataclass
class _Failure:
    count: int
    retry_at: float
    error: str


class DeletionBackoff:
    """Per job: which entries failed to delete, and when each may be tried again."""

    def __init__(self, initial: float = 1.0, maximum: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial, self.maximum, self.clock = initial, maximum, clock
        self._failures: dict[str, _Failure] = {}

    def failed(self, name: str, error: str) -> bool:
        """Record a failure; True when this starts a streak (report it), False after."""
        f = self._failures.get(name)
        count = 1 if f is None else f.count + 1
        delay = min(self.maximum, self.initial * (2 ** (count - 1)))
        self._failures[name] = _Failure(count, self.clock() + delay, error)
        return f is None

    def failing(self, name: str) -> bool:
        """A retry of a known failure (its intent is on record already)."""
        return name in self._failures

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)

    def forget_absent(self, present: set[str]) -> None:
        """An entry removed by someone else is no longer ours to retry."""
        for n in [n for n in self._failures if n not in present]:
            del self._failures[n]

    def undeletable(self) -> dict[str, str]:
        """Names to hold out of this plan (still backing off) -> why."""
        now = self.clock()
        return {n: f"deletion failed {f.count}x ({f.error}); retry in {f.retry_at - now:.0f}s"
                for n, f in self._failures.items() if f.retry_at > now}

    def status_lines(self) -> list[str]:
        now = self.clock()
        return [f"delete-failed: {n}: {f.error} (tried {f.count}x, next in {max(0.0, f.retry_at - now):.0f}s)"
                for n, f in sorted(self._failures.items())]

    def next_retry_in(self) -> float | None:
        if not self._failures:
            return None
        return max(0.0, min(f.retry_at for f in self._failures.values()) - self.clock())


class PassGate:
    """No rotation pass within min_interval of the previous one (monotonic)."""

    def __init__(self, min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval, self.clock = min_interval, clock
        self._last: float | None = None

    def wait_s(self) -> float:
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.min_interval - self.clock())

    def started(self) -> None:
        self._last = self.clock()


def unfinished_intents(events: list[dict]) -> list[dict]:
    """`delete-intent` events with no outcome after them (the daemon died in between).
    At start, each one whose entry is gone gets its `deleted`; one still there is simply
    planned again."""
    open_: dict[str, dict] = {}
    for e in events:                      # in record order (wall-clock "at" may jump)
        path = e.get("path")
        if not isinstance(path, str):
            continue
        if e.get("kind") == "delete-intent":
            open_[path] = e
        elif e.get("kind") in ("deleted", "delete-failed"):
            open_.pop(path, None)
    return list(open_.values())
