"""One job's custody of its checkpoint dir: the held fd and everything deletion must know.

The daemon's per-job checkpoint service keeps one JobCheckpointDir per job and drives it:

    jd = JobCheckpointDir(name, spec.checkpoint, grace, state_dir, create_as=(uid, gid))
    jd.open()                                   # at job add / reload (off the loop)
    jd.before_first_launch()                    # records the inventory once (off the loop)
    infos, flag = jd.scan(cache)                # off the loop; flag: dir replaced -> no deletes
    jd.observe(infos)                           # on the loop: liveness by monotonic clock
    opened = jd.open_by_job(infos, pids)        # off the loop: entries open by the job
    dropped = jd.tidy(infos)                    # off the loop: bookkeeping a framework broke
    pins, kept = jd.bookkeeping(infos)          # off the loop: frameworks' bookkeeping
    plan = jd.plan(infos, pinned=pins, framework_kept=kept, resumed_from=..., also_live=opened,
                   unuploaded=...)
    ... plan_disk_quota over all jobs' plans ...
    for info in plan.delete:                    # intent recorded, then:
        outcome = jd.delete(info)               # off the loop; returns once gone or failed
        events = jd.record(outcome)             # on the loop: what to write to history

Blocking calls (open, scan, open_by_job, delete) touch only the filesystem and return
facts; the on-the-loop calls own the per-job memory (liveness, backoff).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import fdbudget
from ..spec import CheckpointSpec
from . import aside, formats, inventory
from .deleter import DeletionBackoff, Outcome, delete_one
from .dirhandle import CheckpointDirError, DirHandle
from .formats.common import Verdict, VerdictCache
from .index import CheckpointInfo, is_unknown_reason, scan
from .liveness import LivenessTracker, entry_inodes, open_inodes
from .naming import compile_pattern
from .reprove import latest_for_launch, reprovable, reprove, stamps_mapped_writes
from .rotation import RotationPlan, plan_rotation
from .trash import ASIDE_DIR, TRASH_DIR, empty_trash

log = logging.getLogger("trainsup.checkpoint")

# A save is "quiet" after the job's emergency_save.grace plus this long without a change
# the daemon saw: a few rotation passes (>= 1 s apart), so that grace 0 still means "seen
# unchanged across passes", never "changed in the same instant".
QUIET_MARGIN_S = 5.0


class JobCheckpointDir:
    def __init__(self, job: str, spec: CheckpointSpec, grace: float, state_dir: Path | None,
                 create_as: tuple[int, int] | None = None) -> None:
        self.job = job
        self.spec = spec
        self.state_dir = state_dir
        self.create_as = create_as
        self.pattern: re.Pattern | None = compile_pattern(spec.pattern) if spec.pattern else None
        self.handle: DirHandle | None = None
        self.flag: str | None = None          # set: nothing is deleted until re-resolved
        self.liveness = LivenessTracker(quiet=grace + QUIET_MARGIN_S)
        self.backoff = DeletionBackoff()
        self.inventory = inventory.load(state_dir, job) if state_dir is not None else None
        self.planted: list[str] = []          # the daemon's own dir names, planted as links
        self._stamps: tuple[int, bool] | None = None    # (held fd, fingerprints_prove)

    # ------------------------------------------------------------------ blocking

    def open(self, create: bool = False) -> None:
        """Resolve and hold the dir; create: make it if missing (for the job's user)."""
        self.close()
        try:
            fdbudget.check(needed=2, what="hold the checkpoint dir")
            self.handle = DirHandle.open(self.spec.dir, create=create, create_as=self.create_as)
            self.flag = None
        except OSError as e:
            self.handle = None
            # not there yet (before the first launch): nothing to hold, nothing wrong
            self.flag = None if e.errno == errno.ENOENT and not create else \
                f"checkpoint dir not held: {e.strerror or e}"
            return
        try:
            # finish deletions a crash cut short (their outcome: deleter.unfinished_intents)
            empty_trash(self.handle)
        except OSError:
            pass

    def ensure_dir(self) -> str | None:
        """Hold the dir, creating it if it went missing; None when held, else why not."""
        if self.handle is None or (self.flag and not os.path.lexists(self.spec.dir)):
            self.open(create=True)
        return None if self.handle is not None else self.flag

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def before_first_launch(self) -> None:
        if self.state_dir is not None:
            if self.handle is None:
                self.open()
            self.inventory = inventory.record_first_launch(self.state_dir, self.job, self.handle,
                                                           self.spec.dir)

    def scan(self, cache: VerdictCache | None) -> tuple[list[CheckpointInfo], str | None]:
        """The held dir's entries, and a flag when the configured path no longer names it."""
        if self.handle is None:
            self.open()
            if self.handle is None:
                return [], self.flag      # None while it simply does not exist yet
        self.flag = self.handle.check()
        if self.flag and os.fstat(self.handle.fd).st_nlink == 0:
            # the held dir was deleted (rm -rf, then the job made a new one): nothing of it
            # is left to protect, so the path is resolved afresh (symlinks still refused)
            self.open()
            if self.handle is None:
                return [], self.flag
        infos = scan(self.handle, self.spec.format, cache=cache, pattern=self.pattern)
        self.planted = planted_names(self.handle)
        return aside.listed(self.handle) + infos, self.flag

    def move_aside_interrupted(self, infos: list[CheckpointInfo],
                               pinned: Iterable[int] = ()) -> list[tuple[CheckpointInfo, str]]:
        """Before a relaunch, with no process of the job left: interrupted saves newer than
        the newest valid checkpoint go aside so the framework's own "latest" cannot pick them."""
        if self.handle is None or self.flag:
            return []
        # What was there before the job's first launch is never the job's to move either.
        before = self._preexisting(infos)
        todo = [i for i in aside.interrupted(infos, pinned) if i.name not in before]
        try:
            return aside.move_aside(self.handle, todo) if todo else []
        except aside.AsideUnavailable as e:
            # a planted symlink: a warning (status shows `planted`), and the launch goes on
            log.warning("job %s: %s", self.job, e.strerror)
            return []

    def open_by_job(self, infos: Iterable[CheckpointInfo], pids: Iterable[int]) -> set[str]:
        pids = list(pids)
        if self.handle is None or not pids:
            return set()
        opened = open_inodes(pids)
        if not opened:
            return set()
        return {i.name for i in infos if i.managed
                and entry_inodes(self.handle, LivenessTracker.key(i)) & opened}

    def delete(self, info: CheckpointInfo) -> Outcome:
        if self.handle is None or self.flag:
            return Outcome(info, False, error=self.flag or "checkpoint dir not held", errno=errno.ESTALE)
        return delete_one(self.handle, info)

    def tidy(self, infos: Iterable[CheckpointInfo]) -> list[str]:
        """Each format's bookkeeping repaired in every dir that holds its entries (TF's
        state file listing again what was deleted). Returns what was dropped (dir/name)."""
        if self.handle is None or self.flag:
            return []
        out: list[str] = []
        for fmt, d in sorted(tidy_dirs(infos)):
            fn = formats.hook(formats.FORMATS.get(fmt), "tidy", None)
            try:
                dfd = self.handle.open_beneath(d) if d else os.dup(self.handle.fd)
            except OSError:
                continue        # gone, or a symlink now: nothing of ours to repair there
            try:
                out += [f"{d}/{n}" if d else n for n in fn(dfd)]
            except OSError:
                pass            # unreadable or read-only: the next pass tries again
            finally:
                os.close(dfd)
        return out

    def fingerprints_prove(self) -> bool:
        """Whether an unchanged fingerprint proves unchanged content in this dir (mapped
        writes move ctime: reprove.py); False on tmpfs, where only a re-hash does."""
        if self.handle is None:
            return True
        if self._stamps is None or self._stamps[0] != self.handle.fd:
            self._stamps = (self.handle.fd, stamps_mapped_writes(self.handle.io_root))
        return self._stamps[1]

    def latest_for_launch(self, infos: Iterable[CheckpointInfo], cache: VerdictCache | None
                          ) -> CheckpointInfo | None:
        if self.handle is None or self.flag:
            return None
        return latest_for_launch(self.handle.io_root, infos, cache)

    def reprove_latest(self, infos: list[CheckpointInfo], cache: VerdictCache | None
                       ) -> list[CheckpointInfo]:
        """Before a launch: the newest valid checkpoints, newest first, re-proven until one
        holds; those that no longer do are marked invalid (never offered for resume)."""
        if self.handle is None or self.flag:
            return infos
        out = list(infos)
        for pos in range(len(out) - 1, -1, -1):
            i = out[pos]
            if not (i.valid and i.managed and not i.in_progress):
                continue
            if not reprovable(i):
                break
            try:
                v = reprove(f"{self.handle.io_root}/{i.name}", i.format, cache, str(i.path))
            except OSError as e:
                v = Verdict(i.format, False, f"unreadable: {e.strerror or e}")
            if v.valid:
                break
            out[pos] = replace(i, valid=False, invalid_reason=f"changed since verified: {v.invalid_reason}",
                               unknown=is_unknown_reason(v.invalid_reason))
        return out

    # ------------------------------------------------------------------ on the loop

    def bookkeeping(self, infos: list[CheckpointInfo]) -> tuple[set[Any], set[Any]]:
        """(pins, kept above keep_last) for the frameworks' own bookkeeping (HF's best
        checkpoint; Lightning's best_model_path, last_model_path and best k), read through
        the held dir (off the loop: found, a FIFO swapped in for HF's trainer_state.json
        blocked the event loop forever when read there)."""
        if self.handle is None or self.flag:
            return set(), set()
        return formats.bookkeeping(self.handle.fd, infos)

    def observe(self, infos: Iterable[CheckpointInfo]) -> None:
        infos = list(infos)
        self.liveness.observe(infos)
        self.backoff.forget_absent({i.name for i in infos})

    def plan(self, infos: list[CheckpointInfo], *, pinned=frozenset(), framework_kept=frozenset(),
             resumed_from=None, also_live: Iterable[str] = (), unuploaded: Iterable[str] = ()) -> RotationPlan:
        live = self.liveness.live(infos) | set(also_live)
        undeletable = dict(self.backoff.undeletable())
        if self.flag or self.handle is None:
            why = self.flag or "checkpoint dir not held"
            undeletable.update({i.name: why for i in infos})
        return plan_rotation(
            infos, self.spec, pinned=pinned, framework_kept=framework_kept, resumed_from=resumed_from, live=live,
            preexisting=self._preexisting(infos),
            undeletable=undeletable, unuploaded=frozenset(unuploaded))

    def _preexisting(self, infos: list[CheckpointInfo]) -> set[str]:
        if self.inventory is None and self.state_dir is not None:
            # Never launched (its inventory is written by the first launch): everything
            # here predates the job. Found: a rotation pass that ran before the first
            # launch deleted what the job found in its dir.
            return {i.name for i in infos if not i.in_progress
                    and not (self.pattern is not None and self.pattern.fullmatch(i.name))}
        return inventory.preexisting(infos, self.inventory, self.pattern)

    def record(self, outcome: Outcome) -> tuple[str, dict]:
        """(event kind, fields) for history; a repeat failure of a streak is "" (not reported)."""
        info = outcome.info
        fields = {"path": str(info.path), "step": info.step, "bytes": info.bytes}
        if outcome.ok:
            self.backoff.succeeded(info.name)
            if outcome.already_gone:
                fields["note"] = "already gone"
            return "deleted", fields
        first = self.backoff.failed(info.name, outcome.error or "failed")
        return ("delete-failed" if first else ""), {**fields, "error": outcome.error}

    def warnings(self) -> list[str]:
        w = list(self.backoff.status_lines())
        if self.flag:
            w.insert(0, f"rotation paused: {self.flag}; nothing is deleted until it is re-resolved (edit the job file or restart the daemon)")
        return w


def tidy_dirs(infos: Iterable[CheckpointInfo]) -> set[tuple[str, str]]:
    """(format, dir) pairs whose format has a `tidy` hook (on the loop: no I/O)."""
    return {(i.format, i.name.rpartition("/")[0]) for i in infos
            if i.managed and not i.in_progress and formats.hook(formats.FORMATS.get(i.format), "tidy", None)}

def planted_names(h: DirHandle) -> list[str]:
    """Warnings for the daemon's own dir names (trash, aside) found as something else than
    a directory: a symlink planted there is never followed (trash.open_own_dir), and what
    depends on the dir waits until it is removed."""
    out = []
    for name, what in ((TRASH_DIR, "deletions"), (ASIDE_DIR, "moving interrupted saves aside")):
        try:
            st = os.stat(name, dir_fd=h.fd, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            out.append(f"{name} in the checkpoint dir is {kind} (never followed): {what} paused "
                       "until it is removed")
    return out


__all__ = ["JobCheckpointDir", "CheckpointDirError"]
