"""The daemon: one asyncio loop on the main thread that owns every job, the checkpoint
index and the state database. Everything else — signals, the checkpoint watcher, the
hashing pool, the control socket, timers — only posts events to this loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import psutil

from . import __version__, config, process
from .checkpoint import index as ckpt_index
from .checkpoint import rotation, trash
from .checkpoint.watch import CheckpointWatcher
from .crashpoints import crash_point
from .control import ControlServer, Peer, RequestError
from .job import Job, State
from .notices.schedule import JobSchedule
from .sdnotify import Notifier
from .spec import DaemonSpec, InvalidJob, JobSpec
from .state import StateDB, StateLock

log = logging.getLogger("trainsup.daemon")

# The rescan is the source of truth behind inotify (which can overflow and drop events).
# TRAINSUP_RESCAN_INTERVAL shortens it for tests.
RESCAN_INTERVAL = float(os.environ.get("TRAINSUP_RESCAN_INTERVAL", "60"))


_INLINE_SCAN_MAX = 32


def _small_dir(path) -> bool:
    # A directory's size grows with its entries (ext4 blocks, tmpfs entries): a dir
    # flooded with files is listed on the pool, never on the loop.
    try:
        return os.stat(path).st_size <= 16384
    except OSError:
        return True


class _NeedsHashing(Exception):
    pass


class _CachedOnly:
    """A verdict cache view that refuses to let a scan hash anything."""

    def __init__(self, cache):
        self.cache = cache

    def get(self, key: str) -> Optional[str]:
        v = self.cache.get(key)
        if v is None:
            raise _NeedsHashing(key)
        return v

    def put(self, key: str, verdict: str) -> None:
        self.cache.put(key, verdict)


class Daemon:
    def __init__(self, spec: DaemonSpec):
        self.spec = spec
        self.jobs: dict[str, Job] = {}
        self.invalid: dict[str, InvalidJob] = {}
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.is_root = os.geteuid() == 0
        self.loop: asyncio.AbstractEventLoop
        self.db: StateDB
        self._stop = None
        self._exit_code = 0
        self._scans: dict[str, dict] = {}
        self._watchers: dict[str, Any] = {}
        self._rotate_pending = False
        self._rotation_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._sources: list = []
        self.schedule = None
        self.notifier = Notifier.from_env()
        self._me = psutil.Process()

    # -- entry point -------------------------------------------------------------------
    def run(self) -> int:
        self.lock = StateLock(self.spec.state_dir)
        self.lock.acquire()        # raises LockHeld: the CLI turns it into exit 2
        try:
            self.db = StateDB(self.spec.state_dir)
            with self.db.conn:
                pass
            return asyncio.run(self._main())
        finally:
            self.lock.release()

    async def _main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="trainsup-hash")
        self.cache = self.db          # the verdict cache; StateDB locks it for the hashing threads
        self.db.on_pending = lambda: self.loop.call_soon(self.db.flush)
        process.become_subreaper()
        for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_term),
                             (signal.SIGHUP, self._on_hup), (signal.SIGUSR1, self._on_usr1),
                             (signal.SIGCHLD, self._on_chld)):
            self.loop.add_signal_handler(sig, handler)
        self.control = ControlServer(self.spec.socket, self._handle, group=self.spec.socket_group,
                                     job_user_of=self._job_user)
        await self.control.start()
        (self.spec.state_dir / "heartbeat").mkdir(parents=True, exist_ok=True)
        jobs, invalid = config.load_jobs_dir(self.spec.jobs_dir, is_root=self.is_root)
        for spec in jobs:
            self._add_job(spec)
        for inv in invalid:
            self._add_invalid(inv)
        await asyncio.gather(*(self._stale_orphans(j) for j in self.jobs.values()))
        await asyncio.gather(*(self._scan(j) for j in self.jobs.values()))
        for job in self.jobs.values():
            self._autostart(job)
        self._start_notice_sources()
        self._spawn_task(self._periodic())
        self._spawn_task(self._watchdog_pings())
        self.notifier.ready(self._summary())
        log.info("trainsup %s: %d jobs (%d invalid), socket %s", __version__, len(self.jobs),
                 len(self.invalid), self.spec.socket)
        await self._stop.wait()
        await self._shutdown()
        return self._exit_code

    def _spawn_task(self, coro) -> asyncio.Task:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: emergency save, then stop, for %d running jobs",
                 sum(1 for j in self.jobs.values() if j.alive))
        flows = [j.stop(save=True, final=State.PREEMPTED, source="daemon-stop") for j in self.jobs.values()
                 if j.alive or j._flow is not None or j.state in (State.BACKOFF, State.STARTING)]
        if flows:
            await asyncio.gather(*flows, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        for src in self._sources:
            try:
                src.stop()
            except Exception:
                log.exception("stopping %r", src)
        for w in self._watchers.values():
            w.stop()
        await self.control.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for j in self.jobs.values():
            j.log.close()
        self.db.close()

    # -- notice sources: threads that only post to the loop --------------------------
    def _threadsafe(self, fn):
        def post(*args) -> None:
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

    def on_notice(self, notice) -> None:
        """A machine-wide notice (trigger file, cloud metadata): every job saves, and for a
        preemption or maintenance, stops before the deadline."""
        log.warning("notice from %s: %s %s (deadline %s)", notice.source, notice.kind, notice.detail,
                    notice.deadline)
        self.record_event("-", "notice", {"source": notice.source, "kind": notice.kind,
                                          "detail": notice.detail, "deadline": notice.deadline})
        running = [j for j in self.jobs.values() if j.alive]
        if notice.kind == "warning":
            for j in running:
                j.last_notice = {"source": notice.source, "kind": notice.kind, "at": time.time(),
                                 "detail": notice.detail, "outcome": "checkpoint requested"}
                if not j.busy:
                    j.request_save()
            return
        flows = [j.stop(save=True, final=State.PREEMPTED, deadline_wall=notice.deadline, source=notice.source)
                 for j in running]
        if notice.event_id and getattr(self, "cloud", None) is not None:
            self._spawn_task(self._acknowledge(flows, notice))

    async def _acknowledge(self, flows, notice) -> None:
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
        self._spawn_task(self.reload())

    def _on_usr1(self) -> None:
        for j in self.jobs.values():
            if j.alive:
                j.request_save()

    def leader_pids(self) -> list[int]:
        return [j.child.pid for j in self.jobs.values() if j.child]

    def _on_chld(self) -> None:
        process.reap_orphans(self.leader_pids())

    # -- jobs --------------------------------------------------------------------------
    def _job_user(self, name: str) -> Optional[str]:
        j = self.jobs.get(name)
        return j.spec.user if j else None

    def _add_invalid(self, inv: InvalidJob) -> None:
        # Keyed by name unless a valid job or another bad file already has it (a
        # duplicate name): then by file, so no error is hidden.
        key = inv.name if inv.name not in self.invalid and inv.name not in self.jobs else str(inv.source)
        self.invalid[key] = inv
        for line in inv.errors:
            log.error("%s", line)

    def _add_job(self, spec: JobSpec) -> Job:
        job = Job(spec, self)
        self.jobs[spec.name] = job
        if spec.checkpoint is not None:
            try:
                trash.empty_trash(spec.checkpoint.dir)   # finish deletions a crash cut short
            except OSError:
                pass
            self._watch(job)
        self._schedule_job(job)
        return job

    def _autostart(self, job: Job) -> None:
        if job.persisted_state in (State.FAILED.value, State.FINISHED.value, State.STOPPED.value):
            job.state = State(job.persisted_state)
            return
        if job.spec.autostart or job.persisted_state == State.PREEMPTED.value:
            job.start(reason=job.restart_reason)
        else:
            job._set(State.STOPPED)

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
            fut = self.loop.create_future()
            self.loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
            try:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                await asyncio.wait_for(fut, job.spec.stop_timeout)
            except asyncio.TimeoutError:
                try:
                    os.killpg(pid, signal.SIGKILL)
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    await asyncio.wait_for(fut, 5.0)
                except asyncio.TimeoutError:
                    pass
            finally:
                self.loop.remove_reader(fd)
        finally:
            os.close(fd)

    async def reload(self) -> dict:
        jobs, invalid = config.load_jobs_dir(self.spec.jobs_dir, is_root=self.is_root)
        new = {s.name: s for s in jobs}
        added, removed, changed = [], [], []
        self.invalid = {}
        for inv in invalid:
            if inv.name in self.jobs and inv.name not in new:
                # A job whose file broke keeps running as it was; status shows the error.
                continue
            self._add_invalid(inv)
        for name in list(self.jobs):
            if name not in new and name not in self.invalid:
                removed.append(name)
        flows = []
        for name in removed:
            job = self.jobs[name]
            flows.append(self._remove_job(job))
        for name, spec in new.items():
            old = self.jobs.get(name)
            if old is None:
                added.append(name)
                job = self._add_job(spec)
                await self._scan(job)
                self._autostart(job)
            elif old.spec != spec:
                changed.append(name)
                flows.append(self._replace_job(old, spec))
        if flows:
            await asyncio.gather(*flows, return_exceptions=True)
        self.record_event("-", "reload", {"added": added, "removed": removed, "changed": changed})
        return {"added": added, "removed": removed, "changed": changed,
                "invalid": [l for inv in self.invalid.values() for l in inv.errors]}

    async def _remove_job(self, job: Job) -> None:
        if self.schedule is not None:
            self.schedule.remove_job(job.name)
        await job.stop(save=True, final=State.STOPPED, source="reload")
        w = self._watchers.pop(job.name, None)
        if w:
            w.stop()
        job.log.close()
        self.jobs.pop(job.name, None)

    async def _replace_job(self, old: Job, spec: JobSpec) -> None:
        was_running = old.alive or old.state == State.BACKOFF
        await self._remove_job(old)
        job = self._add_job(spec)
        await self._scan(job)
        if was_running or spec.autostart:
            job.start(reason="manual")

    # -- callbacks from jobs -----------------------------------------------------------
    def record_event(self, job: str, kind: str, data: dict) -> None:
        self.db.add_event(job, kind, data)
        if kind != "state":
            log.info("%s: %s %s", job, kind, " ".join(f"{k}={v}" for k, v in data.items() if v is not None))

    def state_changed(self, job: Job) -> None:
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

    # -- checkpoints: watcher -> scan (off the loop) -> index -> rotation -----------------
    def _watch(self, job: Job) -> None:
        name = job.name
        def on_change(_reason: str = "") -> None:       # observer thread: post, do nothing else
            try:
                self.loop.call_soon_threadsafe(self.checkpoint_changed, name)
            except RuntimeError:
                pass   # the loop closed during shutdown
        try:
            w = CheckpointWatcher(job.spec.checkpoint.dir, on_change)
            w.start()
            self._watchers[name] = w
        except Exception as e:
            log.warning("job %s: cannot watch %s (%s); relying on the periodic rescan",
                        name, job.spec.checkpoint.dir, e)

    def checkpoint_changed(self, name: str) -> None:
        job = self.jobs.get(name)
        if job is not None:
            self._spawn_task(self._scan(job))

    async def refresh_checkpoints(self, job: Job) -> None:
        await self._scan(job)

    def _scan_sync(self, job: Job, cache=None):
        ck = job.spec.checkpoint
        try:
            return ckpt_index.scan(ck.dir, ck.format, cache=cache or self.cache), None
        except FileNotFoundError:
            return [], None
        except (OSError, ckpt_index.CheckpointDirError) as e:
            return [], str(e)

    async def _scan(self, job: Job) -> None:
        if job.spec.checkpoint is None:
            return
        st = self._scans.setdefault(job.name, {"running": False, "dirty": False, "done": None})
        if st["running"]:
            st["dirty"] = True       # coalesce: one more scan after the one in flight
            await asyncio.shield(st["done"])
            return
        st["running"] = True
        st["done"] = self.loop.create_future()
        try:
            while True:
                st["dirty"] = False
                infos = None
                if len(job.checkpoints) <= _INLINE_SCAN_MAX and _small_dir(job.spec.checkpoint.dir):
                    # Everything already verified: a few stat calls, done right here (this
                    # sits on the relaunch path). Anything to hash goes to the pool.
                    try:
                        infos, err = self._scan_sync(job, _CachedOnly(self.cache))
                    except _NeedsHashing:
                        infos = None
                if infos is None:
                    infos, err = await self.loop.run_in_executor(self.executor, self._scan_sync, job)
                if self.jobs.get(job.name) is job:
                    job.on_checkpoints(infos, err)
                if not st["dirty"]:
                    break
        finally:
            st["running"] = False
            st["done"].set_result(None)
        self._schedule_rotation()

    def _schedule_rotation(self) -> None:
        if not self._rotate_pending:
            self._rotate_pending = True
            self._spawn_task(self._rotate_all())

    async def _rotate_all(self) -> None:
        # One pass at a time: a pass planned while another deletes would plan from a stale
        # index and delete (and record) the same entry twice.
        async with self._rotation_lock:
            self._rotate_pending = False
            await self._rotate_pass()

    async def _rotate_pass(self) -> None:
        plans: dict[str, rotation.RotationPlan] = {}
        for job in self.jobs.values():
            ck = job.spec.checkpoint
            if ck is None or not job.checkpoints:
                continue
            plans[job.name] = rotation.plan_rotation(
                job.checkpoints, ck, pinned=job.pinned,
                resumed_from=job.resumed_from if job.alive else None,
                tmp_grace=job.spec.emergency_save.grace + 60)
        if self.spec.disk_quota and plans:
            dq = rotation.plan_disk_quota(plans, self.spec.disk_quota)
            plans = dq.plans if hasattr(dq, "plans") else plans
        for name, plan in plans.items():
            job = self.jobs.get(name)
            if job is None:
                continue
            job.rotation = {"over_quota": plan.over_quota, "kept": {str(k): v for k, v in plan.kept.items()}}
            was_over = job.warnings and any(w.startswith("over-quota") for w in job.warnings)
            self._update_warnings(job, plan)
            if plan.over_quota and not was_over:
                job.event("over-quota", bytes=plan.kept_bytes, quota=plan.quota)
            if not plan.delete:
                continue
            ck_dir = job.spec.checkpoint.dir
            for info in plan.delete:
                rel = info.path.relative_to(ck_dir).as_posix() if info.path.is_relative_to(ck_dir) else info.name
                # Recorded before it happens (write-ahead): a crash after the move into the
                # trash still leaves a record of what the daemon removed and why.
                job.event("deleted", path=str(info.path), step=info.step, bytes=info.bytes,
                          why=plan.reasons.get(info.path, "rotation"))
                self.db.flush()
                try:
                    await self.loop.run_in_executor(self.executor, trash.delete_entry, ck_dir, rel)
                    crash_point("delete")
                except OSError as e:
                    job.event("delete-failed", path=str(info.path), error=str(e))
            await self._scan(job)

    def _update_warnings(self, job: Job, plan) -> None:
        w = []
        if plan.over_quota:
            w.append(f"over-quota: {plan.kept_bytes} bytes kept > quota {plan.quota}")
        latest = ckpt_index.latest_valid(job.checkpoints)
        if latest is not None:
            try:
                free = shutil.disk_usage(job.spec.checkpoint.dir).free
                if free < latest.bytes:
                    w.append(f"low disk: {free} bytes free < last checkpoint {latest.bytes} bytes; the next save will fail")
            except OSError:
                pass
        if job.save_durations:
            slow = max(job.save_durations)
            if slow > job.spec.emergency_save.grace:
                w.append(f"slow saves: {slow:.1f}s > grace {job.spec.emergency_save.grace:g}s; "
                         f"an emergency save will not finish in time")
        job.warnings = w

    # -- periodic work: the rescan is the source of truth (inotify can overflow) ----------
    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_INTERVAL)
            for job in list(self.jobs.values()):
                await self._scan(job)

    async def _watchdog_pings(self) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- control requests --------------------------------------------------------------
    def _get(self, name: Optional[str]) -> Job:
        if not name:
            raise RequestError("this command needs a job name")
        job = self.jobs.get(name)
        if job is None:
            if name in self.invalid:
                raise RequestError(f"job {name} is invalid: {self.invalid[name].errors[0]}")
            raise RequestError(f"no such job: {name}")
        return job

    def status(self, name: Optional[str] = None) -> dict:
        jobs = [j.status() for j in self.jobs.values() if name is None or j.name == name]
        for inv in self.invalid.values():
            if name is not None and inv.name != name:
                continue
            jobs.append({"name": inv.name, "state": "invalid", "pid": None, "attempt": 0, "restarts": 0,
                         "last_exit": None, "checkpoint": None, "memory": None,
                         "error": "; ".join(inv.errors), "source": str(inv.source)})
        if name is not None and not jobs:
            raise RequestError(f"no such job: {name}")
        jobs.sort(key=lambda j: j["name"])
        return {"daemon": {"pid": os.getpid(), "version": __version__,
                           "uptime_s": round(time.monotonic() - self.started_mono, 1),
                           "rss": self._me.memory_info().rss, "socket": str(self.spec.socket)},
                "jobs": jobs}

    async def _handle(self, req: dict, peer: Peer, conn) -> Any:
        cmd, name, args = req["cmd"], req["job"], req["args"]
        if cmd == "ping":
            return {"pid": os.getpid(), "version": __version__}
        if cmd == "status":
            return self.status(name)
        if cmd == "reload":
            return await self.reload()
        if cmd == "preempt" and args.get("all"):
            grace = _float_arg(args, "grace")
            outs = await asyncio.gather(*(j.stop(save=True, final=State.PREEMPTED, grace=grace, source="preempt")
                                          for j in self.jobs.values() if j.alive or j.state == State.BACKOFF))
            return {"jobs": len(outs), "outcomes": outs}
        job = self._get(name)
        if cmd == "start":
            if job.alive:
                raise RequestError(f"job {name} is already {job.state.value}")
            job.start(reason="manual")
            return job.status()
        if cmd in ("stop", "preempt"):
            grace = _float_arg(args, "grace")
            final = State.PREEMPTED if cmd == "preempt" else State.STOPPED
            if not job.alive and job._flow is None and job.state not in (State.BACKOFF, State.STARTING):
                raise RequestError(f"job {name} is not running (state {job.state.value})")
            out = await job.stop(save=not args.get("no_save"), final=final, grace=grace, source=cmd)
            return out
        if cmd == "restart":
            if job.alive or job._flow is not None:
                return await job.stop(save=not args.get("no_save"), then_restart="manual", source="restart")
            job.start(reason="manual")
            return job.status()
        if cmd == "checkpoint":
            if not job.alive:
                raise RequestError(f"job {name} is not running (state {job.state.value})")
            sent, fut = job.request_save()
            if not sent:
                raise RequestError(f"no process of job {name} catches {job.spec.emergency_save.signal}")
            if not args.get("wait"):
                return {"signalled": sent}
            timeout = _float_arg(args, "timeout") or job.spec.emergency_save.grace
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise RequestError(f"no new valid checkpoint of {name} within {timeout:g}s") from None
            latest = ckpt_index.latest_valid(job.checkpoints)
            return {"signalled": sent, "step": latest.step if latest else None,
                    "path": str(latest.path) if latest else None}
        if cmd == "checkpoints":
            return self._checkpoints(job)
        if cmd in ("pin", "unpin"):
            step = args.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise RequestError(f"{cmd}: step must be an integer")
            if cmd == "pin":
                if not any(i.step == step for i in job.checkpoints):
                    raise RequestError(f"job {name} has no checkpoint at step {step}")
                job.pinned.add(step)
            else:
                job.pinned.discard(step)
            job.persist()
            job.event(cmd, step=step)
            await self._rotate_all()      # `checkpoints` shows the new verdicts at once
            return {"pinned": sorted(job.pinned)}
        if cmd == "history":
            n = args.get("n", 50)
            if not isinstance(n, int) or n <= 0:
                raise RequestError("history: n must be a positive integer")
            return self.db.events(name, min(n, 10000))
        if cmd == "logs":
            n = args.get("n", 100)
            if not isinstance(n, int) or n < 0:
                raise RequestError("logs: n must be a non-negative integer")
            text = job.log.tail(min(n, 100000))
            if not args.get("follow"):
                return {"text": text}
            return await self._follow(job, text, conn)
        raise RequestError(f"unknown command {cmd}")

    async def _follow(self, job: Job, text: str, conn) -> dict:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        job.log.followers.add(q)
        try:
            await conn.send({"ok": True, "result": {"text": text, "more": True}})
            while True:
                data = await q.get()
                await conn.send({"ok": True, "result": {"text": data.decode(errors="replace"), "more": True}})
        finally:
            job.log.followers.discard(q)

    def _checkpoints(self, job: Job) -> list:
        kept = job.rotation.get("kept", {})
        out = []
        for i in job.checkpoints:
            k = kept.get(str(i.path))
            out.append({"path": str(i.path), "step": i.step, "bytes": i.bytes, "valid": i.valid,
                        "invalid_reason": i.invalid_reason, "kept": k, "reason": i.reason,
                        "format": i.format, "metrics": dict(i.metrics), "mtime": i.mtime})
        return out


def _float_arg(args: dict, key: str) -> Optional[float]:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise RequestError(f"{key} must be a non-negative number of seconds")
    return float(v)
