"""The daemon: one asyncio loop on the main thread that owns every job, the checkpoint
index and the state database. Everything else — signals, the checkpoint watcher, the
hashing pool, the control socket, timers — only posts events to this loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from .. import __version__, config
from ..checkpoint.deleter import unfinished_intents
from ..contract import iso_utc
from ..control.server import ControlServer
from ..spec import DaemonSpec, InvalidJob, JobSpec, ScheduleSpec, rotates
from . import adoption, reexec
from .checkpoints import JobCheckpoints, RotationCoordinator
from .fairpool import FairPool
from .handlers import Commands
from .hooks import HookRunner
from .job import Job, State
from .launch import cgroup, clone3, process
from .notices import Notice
from .notices.schedule import JobSchedule
from .notices.schedule import preload as schedule_preload
from .sdnotify import Notifier
from .state import StateDB, StateLock

log = logging.getLogger("trainsup.daemon")
# Seconds after the jobs are loaded (and their first launches and scans made) to hand the
# heap those left freed back to the system.
RELEASE_MEMORY_AFTER_S = 10.0


def limit_malloc_arenas(n: int = 2) -> None:
    """Before any thread starts: glibc gives each thread that allocates an arena of its own
    (up to 8 per core), each holding freed memory the others cannot reuse. The daemon's
    threads (hashing pool, inotify, metrics) run Python under one GIL: two arenas are enough."""
    try:
        ctypes.CDLL(None).mallopt(-8, n)       # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


SWITCH_INTERVAL_S = float(os.environ.get("TRAINSUP_SWITCH_INTERVAL", "0.001"))
REAP_DELAY_S = 0.05          # how long an orphan the daemon adopted may stay a zombie


POOL_JOIN_S = 5.0        # how long the stop waits for the checkpoint workers to end
# The pool's threads run at the daemon's own priority by default. At nice 10 (so that a
# woken loop would preempt them) a worker holding the GIL waited behind every other
# process for the CPU on a loaded machine while the loop waited for the GIL: `status` p99
# 340 ms under two CPU hogs, 11-14 ms at nice 0 (floor 5-7 ms). TRAINSUP_POOL_NICE=N
# lowers them still, for a machine where the daemon's CPU matters more than its latency.
POOL_NICE = int(os.environ.get("TRAINSUP_POOL_NICE", "0"))


def lower_thread_priority() -> None:
    """The pool's threads at nice TRAINSUP_POOL_NICE (Linux nice is per thread; lowering
    it needs no privilege); 0, the default, leaves them at the daemon's priority."""
    if POOL_NICE <= 0:
        return
    try:
        tid = threading.get_native_id()
        # never above the daemon's own priority (a daemon started at nice 15 stays there)
        os.setpriority(os.PRIO_PROCESS, tid, max(POOL_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Reading 200 job files and their first checkpoint scans leave freed heap behind that
    glibc keeps: ~1.5 MB of the daemon's RSS at 200 jobs. malloc_trim gives it back."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

# The rescan is the source of truth behind inotify (which can overflow and drop events).
# TRAINSUP_RESCAN_INTERVAL shortens it for tests.
RESCAN_INTERVAL = float(os.environ.get("TRAINSUP_RESCAN_INTERVAL", "60"))
STATUS_EVERY_S = 0.1        # systemd STATUS= updates, coalesced
NOTICE_ACTIVE_FOR = 600.0       # a notice without a deadline: how long it blocks `start`
METRICS_SAMPLE_S = 5.0          # jobs' RSS in the metrics is at most this old



class Daemon:
    def __init__(self, spec: DaemonSpec):
        self.spec = spec
        self.jobs: dict[str, Job] = {}
        self.invalid: dict[str, InvalidJob] = {}
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.is_root = os.geteuid() == 0
        self.loop: asyncio.AbstractEventLoop
        self._status_posted = False
        self.db: StateDB
        self.containment: cgroup.Containment | None = None   # set up at start (JobHost)
        self.heartbeat_dir = self.spec.state_dir / "heartbeat"   # JobHost; /run/... at start
        self._stop: asyncio.Event | None = None
        self._exit_code = 0
        self._retired: set[Job] = set()        # replaced/removed jobs whose stop is under way
        self._reload_lock = asyncio.Lock()
        self._reload_requested = 0              # generations: a request is served by the
        self._reload_served = 0                 # first run that starts after it
        self._reload_result: dict = {}
        self.commands = Commands(self)
        self._tasks: set[asyncio.Task] = set()
        self._sources: list = []
        self.schedule: JobSchedule | None = None
        self.notifier = Notifier.from_env()
        self._me = psutil.Process()
        self.active_notices: dict[tuple, Any] = {}    # machine-wide notices in force
        self._notice_seen: dict[tuple, float] = {}
        self.source_health: dict[str, dict] = {}      # notice source -> its last health change
        self.hooks: HookRunner | None = None
        # Children whose exit status another piece of the daemon collects (the reexec
        # preflight, through asyncio): the SIGCHLD reaper must leave them alone.
        self.helper_pids: set[int] = set()
        self.metrics: Any = None                # trainsup.metrics.MetricsServer when enabled
        self.transfers: Any = None              # mirror.transfer.Transfers, at the first mirrored job
        self.config_file = "no config file"     # which daemon config was read, and why (the CLI sets it)
        self.metrics_error: str | None = None   # metrics.required false and they could not start
        self._metrics_sampled = float("-inf")
        self.handover: reexec.Handover | None = None   # this program was exec'd by `trainsup reexec`
        self._reap_soon: asyncio.TimerHandle | None = None     # orphans' zombies reaped at this

    # -- entry point -------------------------------------------------------------------
    def run(self) -> int:
        limit_malloc_arenas()
        # The loop answers people; the threads (/proc sampling, scans, hashing, deletion)
        # only keep up. A thread holding the GIL keeps it up to the switch interval once
        # the loop wants it back: 5 ms by default, 1 ms here.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.handover = reexec.take()
        self.lock = StateLock(self.spec.state_dir)
        # raises LockHeld: the CLI turns it into exit 2 (after `reexec`: the lock never left us)
        self.lock.acquire(inherited=self.handover.lock_fd if self.handover else None)
        try:
            if self.spec.preemption.trigger_file is not None:
                # before anything is served: a folder others can write refuses the start
                from .notices.trigger import prepare_trigger_dir
                prepare_trigger_dir(self.spec.preemption.trigger_file)    # TriggerRefused: exit 2
            self.db = StateDB(self.spec.state_dir)
            with self.db.conn:
                pass
            return asyncio.run(self._main())
        finally:
            self.lock.release()

    async def _main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        log.info("config: %s", self.config_file)
        # First: a port another daemon holds fails the start (exit 2) before anything else
        # is set up, unless metrics.required is false.
        self._start_metrics()
        # Requests that arrive while the jobs dir is first read wait for it: `status` must
        # never answer "no such job" for a job whose file is still settling.
        self.loaded = asyncio.Event()
        # every job's checkpoint work, taken round-robin by job (fairpool.py)
        self.executor = FairPool(workers=2, initializer=lower_thread_priority, name="trainsup-hash")
        self.cache = self.db          # the verdict cache; StateDB locks it for the hashing threads
        self.rotation = RotationCoordinator(self.loop, self.executor.for_job(""), self.spec.disk_quota,
                                            self._rotation_members, self.db.flush)
        self.db.start_writer()
        self.db.on_pending = lambda: None if self.loop.call_soon(self.db.wake) else None
        process.become_subreaper()
        containment = self.containment = cgroup.setup(self.spec.state_dir)
        if containment.kind == cgroup.PROCESS_GROUP:
            log.warning("jobs contained by process group only (%s)", containment.why)
        else:
            log.info("jobs contained by %s under %s", containment.kind, containment.root)
            if containment.kind == cgroup.CGROUP_V2 and not clone3.available():
                log.warning("launching through cgroup.procs, not clone3 (slower): %s", clone3.why_unavailable())
        for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_term),
                             (signal.SIGHUP, self._on_hup), (signal.SIGUSR1, self._on_usr1),
                             (signal.SIGCHLD, self._on_chld)):
            self.loop.add_signal_handler(sig, handler)
        self.control = ControlServer(self.spec.socket, self.commands.handle, group=self.spec.socket_group,
                                     job_owner=self._job_uid, job_names=lambda: list(self.jobs))
        await self.control.start(inherited=self.handover.socket_fd if self.handover else None)
        self.hooks = HookRunner(self.loop, self.spec.hooks, daemon_spec=self.spec,
                                containment=containment if containment.kind != cgroup.PROCESS_GROUP else None)
        if self.metrics is not None:
            self._spawn_task(self.metrics.probe_lag(self._publish_metrics), "metrics lag probe")
        self.heartbeat_dir = process.heartbeat_dir(self.spec.state_dir)
        # YAML and user lookups off the loop; a file still being written is read again
        # by a reload in a moment instead of being taken half-written.
        scan = await self._scan_jobs_dir()
        for spec in scan.jobs:
            self._add_job(spec)
        for inv in scan.invalid:
            self._add_invalid(inv)
        self._reread_unsettled(scan.unsettled)
        self.loaded.set()
        # malloc_trim walks the whole heap (0.1-0.5 s once scans have run): off the loop
        self.loop.call_later(RELEASE_MEMORY_AFTER_S, self.loop.run_in_executor, None, release_freed_memory)
        # Before any launch: the jobs an earlier daemon left running are taken over and the
        # exits that happened meanwhile handled, found by their cgroups and shims, whatever
        # the state DB says (it may be behind, or new).
        taken = await adoption.take_over(self, "re-exec" if self.handover else "restart")
        for job in self.jobs.values():      # deletions a crash cut off from their record
            for e in unfinished_intents(self.db.events(job.name, 500)):
                if _gone(e["path"]):
                    job.event("deleted", path=e["path"], step=e.get("step"), bytes=e.get("bytes"),
                              why=f"{e.get('why')}; completed before a crash, recorded at start")
        # A job an earlier daemon launched without a shim cannot be taken over: ended.
        await asyncio.gather(*(self._stale_orphans(j) for j in self.jobs.values()
                               if j.name not in taken and not j.persisted.get("shim")))
        # Every dir's first scan runs in the background: a launch waits for its own job's
        # dir only (after a crash storm the daemon scanned thousands of checkpoints saved
        # meanwhile, for minutes, before it launched any job at all).
        for j in self.jobs.values():
            self._spawn_task(j.ckpts.refresh(), f"first scan of job {j.name}'s checkpoints")
        for job in self.jobs.values():
            if job.name not in taken:
                self._autostart(job)
        self._start_notice_sources()
        self._spawn_task(self._periodic(), "periodic rescan")
        self._spawn_task(self._watchdog_pings(), "watchdog pings")
        self.notifier.ready(self._summary())
        log.info("trainsup %s: %d jobs (%d invalid, %d taken over), socket %s", __version__, len(self.jobs),
                 len(self.invalid), sum(1 for j in self.jobs.values() if j.child and j.child.adopted),
                 self.spec.socket)
        if self.handover is not None:
            reexec.answer(self.handover, {"pid": os.getpid(), "version": __version__, "was": self.handover.was,
                                          "jobs_kept": sum(1 for j in self.jobs.values() if j.child and j.child.adopted),
                                          "took_s": round(time.time() - self.handover.asked_at, 3)})
        assert self._stop is not None
        await self._stop.wait()
        await self._shutdown()
        return self._exit_code

    def _spawn_task(self, coro: Any, what: str = "task") -> asyncio.Task:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        t.add_done_callback(lambda task: _log_failure(task, what))
        return t

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: emergency save, then stop, for %d running jobs",
                 sum(1 for j in self.jobs.values() if j.alive))
        every = list(self.jobs.values()) + list(self._retired)
        flows = [j.stop(save=True, final=State.PREEMPTED, source="daemon-stop") for j in every if j.active]
        if flows:
            await asyncio.gather(*flows, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        for src in self._sources:
            try:
                src.stop()
            except Exception:
                log.exception("stopping %r", src)
        mirrors = [j.mirror.close() for j in list(self.jobs.values()) + list(self._retired) if j.mirror is not None]
        if mirrors:         # leases handed back (bounded) before the daemon goes
            await asyncio.gather(*mirrors, return_exceptions=True)
        if self.transfers is not None:
            self.transfers.close()
        for j in self.jobs.values():
            j.ckpts.close("the daemon stops")
        if self.hooks is not None:
            self.hooks.stop()
        if self.metrics is not None:
            self.metrics.stop()
        await self.control.close()
        # Started work stops at its next tick (a 100 GiB validation kept the daemon alive 40 s
        # after SIGTERM); the threads are joined, bounded, before the state DB they use closes.
        busy = await self.loop.run_in_executor(
            None, lambda: self.executor.shutdown(wait=True, cancel_futures=True, timeout=POOL_JOIN_S))
        if busy:
            log.warning("stopping: %d checkpoint worker threads still busy after %.0fs: %s",
                        len(busy), POOL_JOIN_S, ", ".join(busy))
        for j in self.jobs.values():
            j.log.close()
        if self.containment is not None:
            self.containment.close()
        process.discard_heartbeat_dir(self.heartbeat_dir)
        self.db.close()

    # -- notice sources: threads that only post to the loop --------------------------
    def _threadsafe(self, fn: Callable[..., None]) -> Callable[..., None]:
        def post(*args: Any) -> None:
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass    # the loop closed during shutdown
        return post

    def _start_notice_sources(self) -> None:
        self.schedule = JobSchedule(self._threadsafe(self._on_schedule))
        for job in self.jobs.values():
            self._schedule_job(job)
        self.schedule.start()
        self._sources.append(self.schedule)
        pre = self.spec.preemption
        if pre.trigger_file is not None:
            from .notices.trigger import TriggerFile
            t = TriggerFile(pre.trigger_file, self._threadsafe(self.on_notice))
            t.start()
            self._sources.append(t)
        if pre.provider:
            from .notices.cloud import CloudPoller
            self.cloud = CloudPoller(pre.provider, self._threadsafe(self.on_notice), poll=pre.poll,
                                     metadata_url=pre.metadata_url)
            source = pre.provider
            self.cloud.on_health = self._threadsafe(lambda ok, error: self._source_health(source, ok, error))
            self.cloud.start()
            self._sources.append(self.cloud)

    def _schedule_job(self, job: Job) -> None:
        if self.schedule is None:
            return
        try:
            self.schedule.set_job(job.name, job.spec.schedule)
        except ValueError as e:
            log.error("job %s: schedule: %s", job.name, e)

    def _on_schedule(self, name: str, what: str) -> None:
        job = self.jobs.get(name)
        if job is None or not job.alive:
            return
        if what == "preempt":
            job.stop(save=True, final=State.PREEMPTED, source="cron")
        elif not job.busy:
            job.request_save()

    def on_notice(self, notice: Notice) -> None:
        """A machine-wide notice (trigger file, cloud metadata): every job saves, and for a
        preemption or maintenance, stops before the deadline."""
        key = notice.identity()
        self._expire_notices()
        if key in self.active_notices:
            return                      # the same notice again (a source re-reported it): once is enough
        self.active_notices[key] = notice
        log.warning("notice from %s: %s %s (deadline %s)", notice.source, notice.kind, notice.detail,
                    iso_utc(notice.deadline) if notice.deadline else "none")
        self.record_event("-", "notice", {"source": notice.source, "kind": notice.kind,
                                          "detail": notice.detail, "deadline": notice.deadline})
        running = [j for j in self.jobs.values() if j.alive]
        if notice.kind == "warning":
            for j in running:
                j.note_notice({"source": notice.source, "kind": notice.kind, "at": time.time(),
                               "detail": notice.detail, "outcome": "checkpoint requested"})
                if not j.busy:
                    j.request_save()
            return
        flows = [j.stop(save=True, final=State.PREEMPTED, deadline_wall=notice.deadline, source=notice.source)
                 for j in running]
        if notice.event_id and getattr(self, "cloud", None) is not None:
            self._spawn_task(self._acknowledge(flows, notice), "acknowledging a notice")

    def _expire_notices(self) -> None:
        now = time.time()
        for key, n in list(self.active_notices.items()):
            # Without a deadline a notice is active for NOTICE_ACTIVE_FOR after it came.
            until = n.deadline if n.deadline else self._notice_seen.setdefault(key, now) + NOTICE_ACTIVE_FOR
            if now > until:
                del self.active_notices[key]
                self._notice_seen.pop(key, None)

    def _source_health(self, source: str, ok: bool, error: str) -> None:
        now = time.time()
        self.source_health[source] = {"source": source, "ok": ok, "error": error or None,
                                      "since": now, "since_iso": iso_utc(now)}

    def notices_in_force(self) -> list:
        self._expire_notices()
        return list(self.active_notices.values())

    def active_preemption(self) -> Any | None:
        """The machine-wide preemption notice in force (a start now would be preempted again)."""
        return next((n for n in self.notices_in_force() if n.kind != "warning"), None)

    async def _acknowledge(self, flows: list[asyncio.Task], notice: Notice) -> None:
        # Azure: tell the platform it may go ahead once every job has saved and stopped.
        await asyncio.gather(*flows, return_exceptions=True)
        try:
            await self.loop.run_in_executor(None, self.cloud.acknowledge, notice)
        except Exception as e:
            log.warning("could not acknowledge %s event %s: %s", notice.source, notice.event_id, e)

    # -- signals (each handler only posts work to the loop) ---------------------------
    def _on_term(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _on_hup(self) -> None:
        self._spawn_task(self.reload(), "reload")

    def _on_usr1(self) -> None:
        for j in self.jobs.values():
            if j.alive:
                j.request_save()

    def leader_pids(self) -> list[int]:
        # Hook processes too: their exit status is the hook runner's to collect.
        hooks = list(self.hooks.pids()) if self.hooks is not None else []
        return [j.child.leader_pid for j in self.jobs.values() if j.child] + hooks + list(self.helper_pids)

    async def claims_exit(self, job: Job) -> bool:
        """JobHost: whether the host decides what this exit means (`trainsup run` under
        Slurm: a preempted step); the daemon leaves every exit to the restart policy."""
        return False

    def _on_chld(self) -> None:
        # A zombie may wait a moment; the relaunch the same exit starts may not. A shim's
        # exit brings its SIGCHLD and its pidfd in one loop turn, and this walk (a read of
        # /proc/self/task/*/children per daemon thread) ran first: about 15% of the loop's
        # time in a relaunch (py-spy). Deferred and coalesced, it runs once the relaunch has
        # gone, once for a burst of exits.
        if self._reap_soon is None:
            self._reap_soon = self.loop.call_later(REAP_DELAY_S, self._reap_orphans)

    def _reap_orphans(self) -> None:
        self._reap_soon = None
        process.reap_orphans(self.leader_pids())

    # -- jobs --------------------------------------------------------------------------
    def _job_uid(self, name: str) -> int | None:
        """The uid job `name` runs as (resolved when its file loaded); None: the daemon's."""
        j = self.jobs.get(name)
        return j.spec.uid if j else None

    def _add_invalid(self, inv: InvalidJob) -> None:
        # Keyed by name unless a valid job or another bad file already has it (a
        # duplicate name): then by file, so no error is hidden.
        key = inv.name if inv.name not in self.invalid and inv.name not in self.jobs else str(inv.source)
        self.invalid[key] = inv
        for line in inv.errors:
            log.error("%s", line)

    def _add_job(self, spec: JobSpec) -> Job:
        ckpts = JobCheckpoints(spec.name, spec.checkpoint, self.loop, self.executor.for_job(spec.name), self.cache,
                               on_index=lambda infos, err: None, on_scanned=self.rotation.request,
                               on_landed=self.rotation.landed,
                               state_dir=self.spec.state_dir, grace=spec.emergency_save.grace,
                               create_as=spec.owner() if self.is_root else None)
        job = Job(spec, self, self.spec, ckpts, self.db.load_job(spec.name))
        if spec.checkpoint is not None and spec.checkpoint.mirror is not None:
            from .mirror.jobmirror import JobMirror
            from .mirror.transfer import Transfers
            if self.transfers is None:
                self.transfers = Transfers(self.loop)
            job.mirror = JobMirror(spec.name, spec.checkpoint, self.transfers, ckpts, job.event, job.log.note,
                                   self.spec.state_dir, job.lease_lost)
        old = self.jobs.get(spec.name)
        if old is not None:
            # `logs -f` follows a job by name: a reload that replaces the job moves its
            # followers to the new log (they went silent on the retired one).
            job.log.followers |= old.log.followers
            old.log.followers.clear()
        self.jobs[spec.name] = job
        ckpts.watch()
        if spec.checkpoint is not None and spec.checkpoint.rescan:
            self._spawn_task(self._rescan_job(job, spec.checkpoint.rescan), f"rescan of {spec.name}")
        self._schedule_job(job)
        return job

    def _rotation_members(self) -> list:
        # A checkpoint dir shared by the nodes of one job is rotated by one node only.
        return [(j.ckpts, j.rotation_facts(), j.event) for j in self.jobs.values() if rotates(j.spec)]

    async def _rescan_job(self, job: Job, interval: float) -> None:
        """checkpoint.rescan: on a network filesystem inotify does not see other hosts'
        writes, so the index (and the confirmation of a save made on another node) is
        kept by rescanning this often."""
        while self.jobs.get(job.name) is job and not job.ckpts.closed:
            await asyncio.sleep(interval)
            try:
                await job.ckpts.refresh()
            except Exception:
                log.exception("job %s: rescan failed", job.name)

    def retired_jobs(self) -> set[Job]:
        """Replaced or removed jobs whose stop is still under way."""
        return self._retired

    def own_rss(self) -> int:
        return self._me.memory_info().rss

    async def _stale_orphans(self, job: Job) -> None:
        """A job process left by a daemon that died: end it before launching again, so
        the job never runs twice. A pid whose start time differs is a stranger: left alone."""
        pid, ctime = job.stale_pid
        if not pid or not ctime or not process.process_matches(pid, ctime):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if not process.process_matches(pid, ctime):
                return
            log.warning("job %s: pid %d from a previous daemon is still running; stopping it", job.name, pid)
            job.event("orphan-stopped", pid=pid)

            def send(sig: int) -> None:
                signal.pidfd_send_signal(fd, sig)
                os.killpg(pid, sig)

            await process.term_then_kill(self.loop, fd, send, job.spec.stop_timeout)
        finally:
            os.close(fd)

    async def reload(self) -> dict:
        """Re-read the jobs dir. Reloads never interleave (SIGHUP and the socket verb
        alike): requests coalesce into one run at a time, and a request is answered by the
        first run that starts after it (so it sees the files as they were when it asked)."""
        self._reload_requested += 1
        mine = self._reload_requested
        async with self._reload_lock:
            if self._reload_served >= mine:
                return self._reload_result
            self._reload_served = self._reload_requested
            self._reload_result = await self._reload_once()
            return self._reload_result

    async def _reload_once(self) -> dict:
        scan = await self._scan_jobs_dir()
        jobs, invalid = scan.jobs, scan.invalid
        unsettled = set(scan.unsettled)
        self._reread_unsettled(scan.unsettled)
        new = {s.name: s for s in jobs}
        by_source = {j.spec.source: j for j in self.jobs.values()}
        added, removed, changed = [], [], []
        self.invalid = {}
        kept_broken: set[str] = set()
        kept_errors: list[str] = []
        for inv in invalid:
            old = by_source.get(inv.source)
            if old is not None and old.name not in new:
                # The job's own file broke (or is half-written): the job keeps running as
                # it was, and status shows the error next to it.
                kept_broken.add(old.name)
                kept_errors.extend(inv.errors)
                old.set_config_error("; ".join(inv.errors))
                for line in inv.errors:
                    log.error("%s", line)
                continue
            self._add_invalid(inv)
        for name in list(self.jobs):
            if name not in new and name not in kept_broken and self.jobs[name].spec.source not in unsettled:
                removed.append(name)     # (a job whose file is mid-write is left as it is)
        flows = [self._remove_job(self.jobs[name]) for name in removed]
        for name, spec in new.items():
            old = self.jobs.get(name)
            if old is None:
                added.append(name)
                job = self._add_job(spec)
                # its first scan in the background, as at start: a reload adding a job with a
                # 100 GiB checkpoint went unanswered (and held every later reload) while it
                # was validated; `checkpoints` and `pin` wait for the first scan themselves
                self._spawn_task(job.ckpts.refresh(), f"first scan of job {name}'s checkpoints")
                self._autostart(job)
            else:
                old.set_config_error(None)
                if old.spec != spec:
                    changed.append(name)
                    flows.append(self._replace_job(old, spec))
        if flows:
            for r in await asyncio.gather(*flows, return_exceptions=True):
                if isinstance(r, BaseException):
                    log.error("reload: %r", r, exc_info=r)
        self.record_event("-", "reload", {"added": added, "removed": removed, "changed": changed})
        if self.metrics is not None:
            self.metrics.book.mark()            # jobs came and went: re-sample them all
        return {"added": added, "removed": removed, "changed": changed,
                "invalid_jobs": sorted({inv.name for inv in self.invalid.values()} | kept_broken),
                "invalid": [l for inv in self.invalid.values() for l in inv.errors]
                + kept_errors}         # each "FILE:LINE: KEY: ..." once, as for an invalid new file

    async def _scan_jobs_dir(self, tries: int = 10) -> config.JobsDirScan:
        """The jobs dir, read off the loop, once its files have settled: a file written
        moments ago (or changing while read) is read again a little later (a half-written
        file with a valid prefix once restarted a job from scratch). Files still busy
        after `tries` come back in `unsettled`; their jobs are left as they are."""
        for attempt in range(tries):
            scan = await self.loop.run_in_executor(None, self._read_jobs)
            if any(s.schedule != ScheduleSpec() for s in scan.jobs):
                await self.loop.run_in_executor(None, schedule_preload)    # not on the loop
            if not scan.unsettled or attempt == tries - 1:
                return scan
            await asyncio.sleep(config.SETTLE_SECONDS)
        raise AssertionError("unreachable")

    def _read_jobs(self) -> config.JobsDirScan:
        """The jobs source, read in a worker thread (`trainsup run` reads one file)."""
        return config.scan_jobs_dir(self.spec.jobs_dir, is_root=self.is_root, state_dir=self.spec.state_dir)

    def _autostart(self, job: Job) -> None:
        """A job just loaded (daemon start or reload): `trainsup run` always starts it."""
        job.autostart()

    def _reread_unsettled(self, files: list) -> None:
        """Files that were being written when read: reload again once they have settled."""
        if files:
            log.info("job files still being written, reading again shortly: %s", ", ".join(map(str, files)))
            self.loop.call_later(2 * config.SETTLE_SECONDS,
                                 lambda: self._spawn_task(self.reload(), "reload of settled job files"))

    async def _retire(self, job: Job) -> None:
        """Stop a job that is being replaced or removed; it can never launch again, and
        until its process is gone it stays known (shutdown stops it too)."""
        job.retire()
        self._retired.add(job)
        if self.schedule is not None:
            self.schedule.remove_job(job.name)
        try:
            await job.stop(save=True, final=State.STOPPED, source="reload")
            if job.mirror is not None:
                await job.mirror.close()
        finally:
            job.ckpts.close()
            if not job.active:
                self._retired.discard(job)
                job.log.close()

    async def _remove_job(self, job: Job) -> None:
        await self._retire(job)
        if self.jobs.get(job.name) is job:
            del self.jobs[job.name]

    async def _replace_job(self, old: Job, spec: JobSpec) -> None:
        was_running = old.active
        await self._retire(old)
        job = self._add_job(spec)
        job.forget_crashes()         # the crash streak was the old spec's
        self._spawn_task(job.ckpts.refresh(), f"first scan of job {job.name}'s checkpoints")
        if was_running or spec.autostart:
            job.start(reason="manual")

    # -- callbacks from jobs -----------------------------------------------------------
    def record_event(self, job: str, kind: str, data: dict) -> None:
        self.db.add_event(job, kind, data)
        if kind != "state":
            log.info("%s: %s %s", job, kind, " ".join(f"{k}={v}" for k, v in data.items() if v is not None))
        if self.metrics is not None:
            self.metrics.book.on_event(job, kind, data)
            self.metrics.schedule_publish(self.loop, self._publish_metrics)
        if self.hooks is not None:
            j = self.jobs.get(job)
            self.hooks.on_event(job, kind, data, job_spec=j.spec if j is not None else None)

    # -- metrics: the loop publishes snapshots; the HTTP thread only reads them ----------
    def _start_metrics(self) -> None:
        if not self.spec.metrics.listen:
            return
        from .metrics import MetricsBook, MetricsServer, MetricsUnavailable
        gid = None
        if self.spec.socket_group:
            import grp
            try:
                gid = grp.getgrnam(self.spec.socket_group).gr_gid
            except KeyError:
                gid = None
        server = MetricsServer(self.spec.metrics.listen, MetricsBook(), self.started_wall, gid=gid)
        try:
            server.start()
        except MetricsUnavailable as e:
            if self.spec.metrics.required:
                # Never run on silently without them: another daemon's numbers would be
                # scraped from this address (and status would not say).
                raise MetricsUnavailable(f"{e} (set metrics.required: false to run without metrics)") from None
            log.error("%s; running without metrics (metrics.required is false)", e)
            self.metrics_error = str(e)
            return
        self.metrics = server
        log.info("metrics at %s", self.metrics_address())

    def metrics_address(self) -> str | None:
        if self.metrics is None:
            return None
        return self.metrics.address

    def _publish_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.book.publish(self.jobs, [inv.name for inv in self.invalid.values()])
            # memory of running jobs: /proc and cgroup reads, off the loop (Commands)
            now = time.monotonic()
            if now - self._metrics_sampled >= METRICS_SAMPLE_S:
                self._metrics_sampled = now
                self._spawn_task(self._sample_for_metrics(), "sampling jobs for metrics")

    async def _sample_for_metrics(self) -> None:
        await self.commands.fresh_proc_samples()
        if self.metrics is not None:
            self.metrics.book.mark()

    def save_job(self, job: str, data: dict) -> None:
        self.db.save_job(job, data)

    def flush(self) -> None:
        self.db.flush()

    def state_changed(self, job: Job) -> None:
        # At most one STATUS= per 0.1 s, however many jobs changed meanwhile (200 jobs
        # loading cost 200 summaries of 200 jobs each): systemctl status shows it, nothing
        # waits on it
        if not self._status_posted:
            self._status_posted = True
            self.loop.call_later(STATUS_EVERY_S, self._post_status)

    def _post_status(self) -> None:
        self._status_posted = False
        self.notifier.status(self._summary())

    def emergency_save_started(self, grace: float) -> None:
        # Tell systemd the stop takes longer while an emergency save runs.
        self.notifier.extend_timeout(grace + 30)

    def _summary(self) -> str:
        counts: dict[str, int] = {}
        for j in self.jobs.values():
            counts[j.state.value] = counts.get(j.state.value, 0) + 1
        if self.invalid:
            counts["invalid"] = len(self.invalid)
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"

    # -- periodic work: the rescan is the source of truth (inotify can overflow) ----------
    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_INTERVAL)
            for job in list(self.jobs.values()):
                try:
                    await job.ckpts.refresh()
                except Exception:
                    # One job's hostile dir must not end the rescan of every job for good.
                    log.exception("job %s: periodic rescan failed", job.name)

    async def _watchdog_pings(self) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def _gone(path: str) -> bool:
    """Only ENOENT is "gone": os.path.lexists also says False for a name it cannot look
    at (ENAMETOOLONG, EACCES), and an entry never deleted was recorded `deleted`."""
    try:
        os.lstat(path)
        return False
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False


def _log_failure(task: asyncio.Task, what: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %r", what, task.exception(), exc_info=task.exception())
