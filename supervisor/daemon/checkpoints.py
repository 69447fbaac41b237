"""Checkpoint handling of the daemon, out of the event loop's wiring: one `JobCheckpoints`
per job (watch, scan coalescing, the index, the rotation verdicts and warnings) and one
`RotationCoordinator` that plans and applies rotation across jobs (the daemon-wide
`disk_quota` needs every job's plan at once).

Both live on the daemon's event loop; the watcher thread only posts to it, hashing runs on
the pool. A Job reads its `JobCheckpoints`; nothing here knows about Job internals beyond
the small `RotationFacts` each job hands over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..checkpoint import aside, budget, layout_warnings, rotation
from ..checkpoint import index as ckpt_index
from ..checkpoint.custody import JobCheckpointDir, tidy_dirs
from ..checkpoint.deleter import PassGate
from ..checkpoint.validate import TooManyFiles
from ..checkpoint.watch import CheckpointWatcher
from ..crashpoints import crash_point
from ..spec import CheckpointSpec
from .rowgen import RowFields

log = logging.getLogger("trainsup.checkpoint")

# An index this small, in a dir this small, is re-checked inline on the loop when every
# verdict is cached: a few stat calls on the relaunch path instead of a pool round trip.
_INLINE_SCAN_MAX = 32
_INLINE_SCAN_S = 0.002      # ... and only while the last scan of it took less than this


def _small_dir(path: str | os.PathLike[str]) -> bool:
    # A directory's size grows with its entries (ext4 blocks, tmpfs entries): a dir
    # flooded with files is listed on the pool, never on the loop.
    try:
        return os.stat(path).st_size <= 16384
    except OSError:
        return True


class _NeedsHashing(Exception):
    pass


class _CachedOnly:
    """A verdict cache view that refuses to let a scan hash anything, or walk an entry of
    more than fingerprint_limit files (validate.check_entry reads it)."""
    fingerprint_limit = 256

    def __init__(self, cache: Any):
        self.cache = cache

    def get(self, key: str) -> str | None:
        # On the loop: never wait for the state DB's lock (the writer thread holds it across
        # a commit's fsync; found: status took 300 ms while another job's history was
        # written). Busy means the pool does this scan.
        lock = getattr(self.cache, "lock", None)
        if lock is not None and not lock.acquire(blocking=False):
            raise _NeedsHashing(key)
        try:
            v = self.cache.get(key)
        finally:
            if lock is not None:
                lock.release()
        if v is None:
            raise _NeedsHashing(key)
        return v

    def put(self, key: str, verdict: str) -> None:
        self.cache.put(key, verdict)


@dataclass
class RotationFacts:
    """What rotation needs from a job besides its index: never delete these."""
    pinned: frozenset[int] = frozenset()
    resumed_from: str | None = None          # only while an attempt runs
    tmp_grace: float = 180.0
    save_durations: tuple[float, ...] = ()
    grace: float = 120.0
    pids: tuple[int, ...] = ()                  # the job's processes: what they hold open is live
    # valid checkpoints the mirror has yet to upload: kept while the quota allows (mirror/)
    unuploaded: frozenset[str] = frozenset()


@dataclass
class JobCheckpoints(RowFields):
    """One job's checkpoint dir as the daemon sees it."""
    # What a status row shows of it (rowgen.py): assigning any of these re-makes the row.
    ROW_FIELDS: ClassVar[frozenset[str]] = frozenset({"infos", "over_quota", "error", "warnings"})
    name: str
    spec: CheckpointSpec | None
    loop: asyncio.AbstractEventLoop
    executor: Executor
    cache: Any
    on_index: Callable[[list, str | None], None]     # the job's reaction to a new index
    on_scanned: Callable[[], None]                      # asks for a rotation pass
    # new entries landed: the coordinator rotates at once when they put a quota over
    on_landed: Callable[[JobCheckpoints], None] | None = None
    infos: list = field(default_factory=list)
    error: str | None = None
    kept: dict[str, str] = field(default_factory=dict)
    over_quota: bool = False
    warnings: list[str] = field(default_factory=list)
    in_place: layout_warnings.InPlaceWrites = field(default_factory=layout_warnings.InPlaceWrites)
    _watcher: Any = None
    _running: bool = False
    _dirty: bool = False
    _next: asyncio.Future | None = None     # the scan after the running one
    closed: bool = False
    # custody of the dir (checkpoint/custody.py): the held fd, liveness, backoff, inventory
    state_dir: Path | None = None
    grace: float = 120.0
    create_as: tuple[int, int] | None = None
    custody: JobCheckpointDir | None = None
    _for_launch: bool = False
    _posted: bool = False        # a change is posted to the loop and not yet taken
    _scan_asked: bool = False    # changed() made a scan task that has not begun
    _last_scan_s: float = 0.0
    _known: frozenset[str] = frozenset()   # managed entry names of the last scan
    _landed: bool = False
    _first_scan: asyncio.Event = field(default_factory=asyncio.Event)

    # -- watching -----------------------------------------------------------------
    def watch(self) -> None:
        if self.spec is None:
            return
        # resolved once and held (created for the job's user if missing); finishes
        # deletions a crash cut short
        self.custody = JobCheckpointDir(self.name, self.spec, self.grace, self.state_dir, self.create_as)
        self.custody.open()
        loop = self.loop

        def on_change(_reason: str = "") -> None:      # observer thread: post, nothing else
            # One post until the loop has taken it: an entry of 20k files moved in is 20k
            # events (watchdog walks it), and 20k callbacks and scan tasks stalled status.
            if self._posted:
                return
            self._posted = True
            try:
                loop.call_soon_threadsafe(self._take_post)
            except RuntimeError:
                self._posted = False      # the loop closed during shutdown
        try:
            self._watcher = CheckpointWatcher(self.spec.dir, on_change)
            self._watcher.start()
        except Exception as e:
            log.warning("job %s: cannot watch %s (%s); relying on the periodic rescan",
                        self.name, self.spec.dir, e)

    def has_interrupted(self, pinned: Iterable[int] = ()) -> bool:
        """Whether the index shows a save to move aside before a launch (on the loop: no I/O)."""
        return self.custody is not None and bool(aside.interrupted(self.infos, pinned))

    async def move_aside_interrupted(self, pinned: Iterable[int] = ()) -> list[tuple[Any, str]]:
        """Interrupted saves newer than the newest valid one, renamed aside (never deleted)
        before a relaunch; the index is refreshed when anything moved."""
        if self.custody is None or not self.has_interrupted(pinned):
            return []
        moved = await self.loop.run_in_executor(self.executor, self.custody.move_aside_interrupted,
                                                list(self.infos), list(pinned))
        if moved:
            await self.refresh()
        return moved

    def reproof_needed(self) -> bool:
        """A launch must re-check content, not fingerprints, before it is handed a resume
        point: the dir is on tmpfs (a write through a shared mmap never moves ctime there).
        One statfs per held dir, remembered."""
        return self.custody is not None and not self.custody.fingerprints_prove()

    def ensure_dir(self) -> str | None:
        """Before a launch: the checkpoint dir exists (made for the job's user if it went
        missing, never through a symlink). None when fine, else why not."""
        if self.spec is None:
            return None
        if self.custody is None:
            self.custody = JobCheckpointDir(self.name, self.spec, self.grace, self.state_dir, self.create_as)
        return self.custody.ensure_dir()

    def close(self, why: str = "the job was removed or replaced") -> None:
        self.closed = True
        # its verdicts are no longer wanted: what the pool still does for it stops at its
        # next tick (a 100 GiB validation of a removed job held a worker to its end)
        cancel = getattr(self.executor, "cancel", None)
        if cancel is not None:
            cancel(why)
        # A scan running on the pool holds the dir's fd: closed under it, the number could
        # be reused by another open before the scan's next *at() call. It closes when done.
        if self.custody is not None and not self._running:
            self.custody.close()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _take_post(self) -> None:
        self._posted = False
        self.changed()

    def changed(self) -> None:
        """Something in the dir changed: one scan more. A scan already running re-scans
        when it ends; one already asked for and not begun covers this change too."""
        if self.closed or self._scan_asked:
            return
        if self._running:
            self._dirty = True
            return
        self._scan_asked = True
        task = self.loop.create_task(self._asked_refresh())
        task.add_done_callback(_log_failure(f"job {self.name}: checkpoint scan"))

    async def _asked_refresh(self) -> None:
        self._scan_asked = False
        await self.refresh()

    # -- scanning -----------------------------------------------------------------
    def _scan_sync(self, cache: Any = None, for_launch: bool = False) -> tuple[list, str | None]:
        assert self.spec is not None
        try:
            if self.custody is not None:
                if for_launch:     # what was there before the first launch is never the job's
                    self.custody.before_first_launch()
                infos, flag = self.custody.scan(cache or self.cache)
                if for_launch:     # re-prove what a launch would be handed (reprove.py)
                    infos = self.custody.reprove_latest(infos, cache or self.cache)
                return infos, flag
            return ckpt_index.scan(self.spec.dir, self.spec.format, cache=cache or self.cache), None
        except FileNotFoundError:
            return [], None
        except (OSError, ckpt_index.CheckpointDirError) as e:
            return [], str(e)
        except (_NeedsHashing, TooManyFiles, budget.Cancelled):
            raise
        except Exception as e:
            # A hostile entry must never kill the scan task for good: one line, keep going.
            log.exception("job %s: scanning %s", self.name, self.spec.dir)
            return [], f"scan failed: {e!r}"

    async def refresh(self, for_launch: bool = False) -> None:
        """Re-read the dir (cached verdicts cost stat calls only). Returns once a scan that
        began after the call has ended. Concurrent requests coalesce: at most one scan
        runs, and one more after it if anything asked meanwhile -- in the background, so a
        caller waits for one scan, never for a dir to stop changing (a job saving faster
        than its dir is scanned held the daemon's start, and every other job's launch).
        for_launch: also re-prove the newest valid checkpoint's content (on the pool)."""
        if self.spec is None:
            return
        if self._watcher is not None:
            # the one reader thread all jobs share, started again should anything have ended it
            self._watcher.hub.ensure_running()
        self._for_launch = self._for_launch or for_launch
        if self._running:
            self._dirty = True
            assert self._next is not None
            await asyncio.shield(self._next)
            return
        self._running = True
        self._dirty = False
        nxt = self._next = self.loop.create_future()     # for those who ask while this scan runs
        try:
            result: tuple[list, str | None] | None = None
            prove, self._for_launch = self._for_launch, False
            # inline only while scans are cheap: an entry of 20k files costs 20k lstat
            # calls even when every verdict is cached (status would stall behind it)
            if (not prove and len(self.infos) <= _INLINE_SCAN_MAX and self._last_scan_s < _INLINE_SCAN_S
                    and _small_dir(self.spec.dir)):
                try:
                    t = time.perf_counter()
                    result = self._scan_sync(_CachedOnly(self.cache))
                    self._last_scan_s = time.perf_counter() - t
                except (_NeedsHashing, TooManyFiles):   # not cheap after all: the pool
                    result = None
            if result is None:
                t = time.perf_counter()
                try:
                    result = await self.loop.run_in_executor(self.executor, self._scan_sync, None, prove)
                except (budget.Cancelled, asyncio.CancelledError):
                    if not self.closed:
                        raise
                    result = ([], None)     # closed meanwhile: nothing of it is taken below
                self._last_scan_s = time.perf_counter() - t
            infos, err = result
            if not self.closed:
                names = frozenset(i.name for i in infos if i.managed)
                self._landed = self._landed or bool(names - self._known)
                self._known = names
                self.infos, self.error = infos, err
                if self.custody is not None:
                    self.custody.observe(infos)     # liveness: the daemon's monotonic clock
                self.in_place.observe(infos)
                if not infos:       # no rotation pass runs for an empty index
                    self.warnings = self._layout_warnings()
                self.on_index(infos, err)
        finally:
            self._running = False
            self._first_scan.set()
            if self.closed and self.custody is not None:
                self.custody.close()        # deferred by close() while this scan ran
            if self._dirty and not self.closed:
                task = self.loop.create_task(self._follow_up(nxt))
                task.add_done_callback(_log_failure(f"job {self.name}: checkpoint scan"))
            else:
                nxt.set_result(None)
        self.on_scanned()
        if self._landed and self.on_landed is not None:
            self._landed = False
            self.on_landed(self)

    async def _follow_up(self, asked: asyncio.Future) -> None:
        """The scan asked for while the last one ran; resolves what those callers wait on.
        After a slow scan it waits as long as that scan took: a dir that never stops changing
        (found: a file swapped every 20 ms) gets at most half of a worker."""
        try:
            if self._last_scan_s > 0.05:
                await asyncio.sleep(min(self._last_scan_s, 5.0))
            await self.refresh()
        finally:
            if not asked.done():
                asked.set_result(None)

    async def first_scan(self, timeout: float = 30.0) -> None:
        """Once the dir has been scanned at least once (a `pin` in the first second after
        start answered "no checkpoint at step N" while the first scan ran). Bounded: a dir
        whose first scan takes longer is answered from what is known by then."""
        if self.spec is None or self._first_scan.is_set():
            return
        try:
            await asyncio.wait_for(self._first_scan.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def managed_bytes(self) -> int:
        """What the job's own entries take (what its quota counts)."""
        return sum(i.bytes for i in self.infos if i.managed)

    def forget(self, names: set[str]) -> None:
        """Entries rotation just deleted leave the index now (the rescan confirms)."""
        if names and not self.closed:
            self.infos = [i for i in self.infos if i.name not in names]

    # -- verdicts -----------------------------------------------------------------
    def latest_valid(self) -> ckpt_index.CheckpointInfo | None:
        if self.custody is not None and self.custody.flag:
            return None     # the configured path now names another dir: offer nothing from it
        return ckpt_index.latest_valid(self.infos) if self.infos else None

    def apply_plan(self, plan: rotation.RotationPlan, facts: RotationFacts) -> bool:
        """Record rotation's verdicts and recompute warnings; True when the job just
        went over its quota."""
        was_over = self.over_quota
        self.kept = {str(k): v for k, v in plan.kept.items()}
        self.over_quota = plan.over_quota
        w = []
        if plan.over_quota:
            w.append(f"over-quota: {plan.kept_bytes} bytes kept > quota {plan.quota}")
        latest = self.latest_valid()
        if latest is not None and self.spec is not None:
            try:
                free = shutil.disk_usage(self.spec.dir).free
                if free < latest.bytes:
                    w.append(f"low disk: {free} bytes free < last checkpoint {latest.bytes} bytes; "
                             f"the next save will fail")
            except OSError:
                pass
        if facts.save_durations:
            slow = max(facts.save_durations)
            if slow > facts.grace:
                w.append(f"slow saves: {slow:.1f}s > grace {facts.grace:g}s; "
                         f"an emergency save will not finish in time")
        if self.custody is not None:
            w += self.custody.warnings()           # delete failures (once each), dir replaced
        self.warnings = w + self._layout_warnings()
        return plan.over_quota and not was_over

    def over_disk_quota(self, disk_quota: int | None) -> bool:
        """Every job together keeps more than the daemon-wide quota: this one is over too.
        True when it just went over."""
        if self.over_quota:
            return False
        self.over_quota = True
        self.warnings.append(f"over-quota: all jobs keep more than disk_quota {disk_quota} bytes")
        return True

    def after_deletions(self, kept_bytes: int, failed_bytes: int, quota: int | None) -> bool:
        """A pass's deletions are over: their failures show in status at once (reported
        once, retried on backoff). True when what could not be deleted puts the job over
        its quota after all (it still takes the space)."""
        assert self.custody is not None
        self.warnings = [w for w in self.warnings if not w.startswith(("delete-failed", "rotation paused"))]
        self.warnings += self.custody.warnings()
        went_over = False
        if failed_bytes and quota is not None and kept_bytes + failed_bytes > quota and not self.over_quota:
            self.over_quota = True
            self.warnings.append(f"over-quota: {kept_bytes + failed_bytes} bytes kept > quota {quota} "
                                 f"({failed_bytes} bytes could not be deleted)")
            went_over = True
        self.touch()
        return went_over

    def _layout_warnings(self) -> list[str]:
        if self.spec is None or self.error is not None:
            return []
        found = (layout_warnings.unrecognised(self.spec.dir, self.spec.format, self.infos),
                 self.in_place.warning())
        planted = self.custody.planted if self.custody is not None else []
        return [w for w in found if w] + planted


class RotationCoordinator:
    """Plans rotation for every job at once (disk_quota spans jobs) and deletes through the
    trash on the pool. One pass at a time: a pass planned while another deletes would plan
    from a stale index and delete (and record) the same entry twice."""

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: Executor, disk_quota: int | None,
                 jobs: Callable[[], Iterable[tuple[JobCheckpoints, RotationFacts, Callable[..., None]]]],
                 flush: Callable[[], None]):
        self.loop = loop
        self.executor = executor
        self.disk_quota = disk_quota
        self.jobs = jobs            # -> (checkpoints, facts, event recorder) per job
        self.flush = flush
        self._pending = False
        self._lock = asyncio.Lock()
        self._busy: set[str] = set()              # jobs whose plan or deletions are running
        self._tasks: dict[str, asyncio.Task] = {}
        self._asked_while_busy: dict[str, bool] = {}
        # No pass within 1 s of the last, whatever woke it (an event flood costs one pass a
        # second) -- unless new entries put a dir over its quota: then at once.
        self._gate = PassGate(1.0)
        self._urgent = False
        self._gate_wait: asyncio.Future | None = None
        self._retry: asyncio.TimerHandle | None = None

    def request(self) -> None:
        if not self._pending:
            self._pending = True
            task = self.loop.create_task(self.run())
            task.add_done_callback(_log_failure("rotation pass"))

    def landed(self, ck: JobCheckpoints) -> None:
        """New entries in `ck`'s dir: a pass now, not at the gate's next tick, when they put
        it over its quota (or every job over disk_quota). On a 1 s tick a job saving ten
        1 MiB checkpoints a second held 8.5 MB under a 4 MiB quota."""
        over = ck.spec is not None and ck.spec.quota is not None and ck.managed_bytes() > ck.spec.quota
        if not over and self.disk_quota:
            over = sum(m[0].managed_bytes() for m in self.jobs()) > self.disk_quota
        if not over:
            return                      # on_scanned already asked for a gated pass
        self._urgent = True
        if self._gate_wait is not None and not self._gate_wait.done():
            self._gate_wait.set_result(None)
        self.request()

    async def run(self, wait_for: str | None = None) -> None:
        """One pass. wait_for: also wait until that job's plan is applied and its deletions
        are done (`pin` answers with the new verdicts)."""
        async with self._lock:
            wait = self._gate.wait_s()
            if wait > 0 and not self._urgent:
                self._gate_wait = self.loop.create_future()
                try:
                    await asyncio.wait_for(self._gate_wait, wait)
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._gate_wait = None
            self._urgent = False
            self._pending = False
            self._gate.started()
            await self._pass()
        task = self._tasks.get(wait_for) if wait_for is not None else None
        if task is not None:
            await asyncio.wait([task])

    async def _pass(self) -> None:
        """Plan every job (each on its own queue, all at once), then delete per job on tasks
        of their own: one job's slow planning or deletion (a 100,000-file entry, a dir that
        never stops changing) never holds another job's rotation. A job whose deletions
        are still running is left out until they end (then a pass is asked for)."""
        members: dict[str, tuple[JobCheckpoints, RotationFacts, Callable[..., None]]] = {}
        for ck, facts, record in self.jobs():
            # Without custody of the dir (the held fd, liveness, inventory) nothing is
            # planned: every deletion-safety fact comes from it.
            if ck.spec is None or not ck.infos or ck.closed or ck.custody is None:
                continue
            if ck.name in self._busy:
                self._asked_while_busy[ck.name] = True
                continue
            members[ck.name] = (ck, facts, record)
        if not members:
            return
        if self.disk_quota:
            # the daemon-wide quota needs every plan at once
            got = await asyncio.gather(*(self._plan(ck, facts) for ck, facts, _ in members.values()))
            plans = dict(zip(members, got))
            dq = rotation.plan_disk_quota(plans, self.disk_quota)
            for name, plan in plans.items():
                self._start(members[name], plan, dq.delete.get(name, []), dq.reasons, dq.over_quota)
        else:
            for m in members.values():
                self._busy.add(m[0].name)
                task = self._tasks[m[0].name] = self.loop.create_task(self._job_pass(m))
                task.add_done_callback(self._job_done(m[0]))
        self._schedule_retry(m[0] for m in members.values())

    async def _job_pass(self, m: tuple[JobCheckpoints, RotationFacts, Callable[..., None]]) -> None:
        ck, facts, _ = m
        plan = await self._plan(ck, facts)
        await self._apply(m, plan, [], {}, False)

    def _start(self, m: tuple[JobCheckpoints, RotationFacts, Callable[..., None]], plan: rotation.RotationPlan,
               extra: list, reasons: dict, all_over: bool) -> None:
        self._busy.add(m[0].name)
        task = self._tasks[m[0].name] = self.loop.create_task(self._apply(m, plan, extra, reasons, all_over))
        task.add_done_callback(self._job_done(m[0]))

    def _job_done(self, ck: JobCheckpoints) -> Callable[[asyncio.Future], None]:
        name = ck.name
        log_failure = _log_failure(f"job {name}: rotation")

        def done(task: asyncio.Future) -> None:
            self._busy.discard(name)
            if self._tasks.get(name) is task:
                del self._tasks[name]
            log_failure(task)
            if not task.cancelled() and self._asked_while_busy.pop(name, False):
                self.request()      # something changed meanwhile: plan again
                self.landed(ck)     # ... at once when it is over its quota
        return done

    async def _plan(self, ck: JobCheckpoints, facts: RotationFacts) -> rotation.RotationPlan:
        assert ck.custody is not None
        infos = list(ck.infos)
        custody = ck.custody
        if tidy_dirs(infos):
            # bookkeeping a framework broke again since the last pass (TF's state file
            # listing deleted saves): repaired before anything is planned
            dropped = await self.loop.run_in_executor(ck.executor, custody.tidy, infos)
            if dropped:
                log.info("job %s: dropped from the framework's bookkeeping (files gone): %s",
                         ck.name, ", ".join(dropped))
        # The frameworks' bookkeeping stays (a job's files: read off the loop, on the job's
        # own queue): HF's best checkpoint and Lightning's best/last as pins, the rest of
        # Lightning's best k above keep_last
        fw_pins, fw_kept = await self.loop.run_in_executor(ck.executor, custody.bookkeeping, infos)
        pinned = set(facts.pinned) | fw_pins
        # Files the job holds open are being written: checked only for what the plan
        # would delete (a walk of every entry would cost each pass), re-planned until
        # nothing planned is open.
        opened: set[str] = set()
        for _ in range(4):
            plan = custody.plan(infos, pinned=pinned, framework_kept=fw_kept, resumed_from=facts.resumed_from,
                                also_live=opened, unuploaded=facts.unuploaded)
            held = await self.loop.run_in_executor(
                ck.executor, ck.custody.open_by_job,
                [i for i in plan.delete + [i for _, i in plan.ladder] if i.name not in opened], facts.pids)
            if not held:
                return plan
            opened |= held
        # the job keeps opening what we would delete: nothing this pass
        return custody.plan(infos, pinned=pinned, framework_kept=fw_kept, resumed_from=facts.resumed_from,
                            also_live={i.name for i in infos})

    async def _apply(self, m: tuple[JobCheckpoints, RotationFacts, Callable[..., None]], plan: rotation.RotationPlan,
                     extra: list, reasons: dict, all_over: bool) -> None:
        ck, facts, record = m
        if ck.closed:
            return
        went_over = ck.apply_plan(plan, facts)
        if all_over and ck.over_disk_quota(self.disk_quota):
            went_over = True
        if went_over:
            record("over-quota", bytes=plan.kept_bytes, quota=plan.quota or self.disk_quota)
        ck.touch()      # its warnings may have changed in place: status re-reads them
        todo = list(plan.delete) + [i for i in extra if i not in plan.delete]
        if not todo:
            return
        assert ck.spec is not None and ck.custody is not None
        failed_bytes = 0
        gone: set[str] = set()
        for info in todo:
            if ck.closed:
                return
            why = plan.reasons.get(info.path) or reasons.get(info.path, "rotation")
            # Intent apart from outcome: a crash after the move into the trash still
            # leaves a record of what the daemon set out to remove and why; `deleted`
            # is written only once the entry is gone (deleter.py).
            if not ck.custody.backoff.failing(info.name):
                record("delete-intent", path=str(info.path), step=info.step, bytes=info.bytes, why=why)
            # the intent is committed before the delete starts, both off the loop, on the
            # job's own queue: its slow deletions never hold another job's work
            outcome = await self.loop.run_in_executor(ck.executor, self._commit_then_delete, ck.custody, info)
            if outcome.ok:
                crash_point("delete")
            kind, fields = ck.custody.record(outcome)
            if kind:
                record(kind, why=why, **fields)
            if not outcome.ok:
                failed_bytes += info.bytes
            else:
                gone.add(info.name)
        quota = plan.quota or self.disk_quota
        if ck.after_deletions(plan.kept_bytes, failed_bytes, quota):
            record("over-quota", bytes=plan.kept_bytes + failed_bytes, quota=quota)
        # What went is out of the index at once (no next pass plans it again), and the
        # rescan runs on its own: awaited here, a job whose dir never stops changing held
        # the pass, and with it every other job's rotation (found: quota not applied).
        ck.forget(gone)
        ck.changed()

    def _commit_then_delete(self, custody: JobCheckpointDir, info: ckpt_index.CheckpointInfo) -> Any:
        self.flush()
        return custody.delete(info)

    def _schedule_retry(self, cks: Iterable[JobCheckpoints]) -> None:
        """A failed deletion is retried when its backoff ends, not by spinning; an entry
        kept only while its quiet window runs is looked at again when the window ends."""
        cks = list(cks)
        waits = [w for ck in cks if ck.custody is not None
                 and (w := ck.custody.backoff.next_retry_in()) is not None]
        waits += [w for ck in cks if ck.custody is not None
                  and (w := ck.custody.liveness.next_quiet_in()) is not None]
        if waits and self._retry is None:
            def fire() -> None:
                self._retry = None
                self.request()
            self._retry = self.loop.call_later(min(waits) + 0.05, fire)


def _log_failure(what: str) -> Callable[[asyncio.Future], None]:
    def done(task: asyncio.Future) -> None:
        if not task.cancelled() and isinstance(task.exception(), budget.Cancelled):
            log.info("%s cancelled: %s", what, task.exception())
        elif not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %r", what, task.exception(), exc_info=task.exception())
    return done
