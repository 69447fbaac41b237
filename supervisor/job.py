"""One job: its state machine, its launches, its stop flow and its restart policy.

A Job is owned by the daemon's event loop and touched by nothing else. Every state change
goes through `_set()`, which checks the transition is allowed and records an event: the
event history is what `status` and `history` read (there is no second bookkeeping).

A Job gets its dependencies, not its owner: a narrow `JobHost` (record events, persist,
say the state changed), the daemon's settings, and its own `JobCheckpoints` (the index and
rotation verdicts). The daemon and the monitor never write a Job's fields; they call its
methods (start, stop, request_save, autostart, retire) and read `status()`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from . import cgroup, process
from .backoff import RestartTracker
from .checkpoint.service import JobCheckpoints, RotationFacts
from .crashpoints import crash_point
from .joblog import JobLog
from .monitor import AttemptMonitor
from .notices.hang import is_stopped
from .spec import DaemonSpec, JobSpec

log = logging.getLogger("trainsup.job")


class State(str, enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    SAVING = "saving"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    FAILED = "failed"
    INVALID = "invalid"


S = State
_IDLE = {S.PENDING, S.STOPPED, S.PREEMPTED, S.FINISHED, S.FAILED}
_ALIVE = {S.RUNNING, S.SAVING, S.STOPPING}
# Allowed predecessor states of each state (supervisord's change_state() idea).
_ALLOWED: dict[State, set[State]] = {
    S.STARTING: _IDLE | {S.BACKOFF, S.STOPPING},
    S.RUNNING: {S.STARTING, S.SAVING},
    S.SAVING: {S.RUNNING},
    S.STOPPING: {S.RUNNING, S.SAVING, S.STARTING},
    S.BACKOFF: {S.STARTING, S.RUNNING, S.SAVING},
    S.STOPPED: _ALIVE | {S.BACKOFF, S.PENDING, S.STARTING, S.FAILED, S.FINISHED, S.PREEMPTED},
    S.PREEMPTED: _ALIVE | {S.BACKOFF, S.STARTING, S.PENDING},
    S.FINISHED: {S.RUNNING, S.SAVING},
    S.FAILED: {S.STARTING, S.RUNNING, S.SAVING, S.STOPPING},
    S.PENDING: set(),
    S.INVALID: set(),
}

class TransitionError(RuntimeError):
    pass


class JobHost(Protocol):
    """What a Job may ask of the daemon that runs it."""
    loop: asyncio.AbstractEventLoop
    containment: Optional[cgroup.Containment]   # None: process group only
    heartbeat_dir: Path

    def record_event(self, job: str, kind: str, data: dict) -> None: ...
    def save_job(self, job: str, data: dict) -> None: ...
    def flush(self) -> None: ...
    def state_changed(self, job: "Job") -> None: ...
    def emergency_save_started(self, grace: float) -> None: ...
    def leader_pids(self) -> list[int]: ...
    async def claims_exit(self, job: "Job") -> bool: ...


def _ckpt_key(info) -> tuple:
    return (str(info.path), info.step, info.mtime, info.bytes)


class Job:
    def __init__(self, spec: JobSpec, host: JobHost, settings: DaemonSpec, ckpts: JobCheckpoints,
                 persisted: dict):
        self.spec = spec
        self.host = host
        self.loop = host.loop
        self.settings = settings
        self.ckpts = ckpts
        ckpts.on_index = self.on_checkpoints
        self.name = spec.name
        self.state = S.PENDING
        self.state_since = time.time()
        self.retired = False
        self.config_error: Optional[str] = None   # the job's file broke on reload; still running
        self.child: Optional[process.Child] = None
        self.log = JobLog(settings.log_dir / f"{spec.name}.log",
                          settings.log_max_bytes, settings.log_backups)
        self.tracker = RestartTracker(spec.restart)
        self.attempt = 0
        self.restarts = 0
        self.last_exit: Optional[dict] = None
        self.error: Optional[str] = None
        self.restart_reason = "first"
        self.resumed_from: Optional[str] = None
        self.pinned: set[int] = set()
        self.last_notice: Optional[dict] = None
        self.memory_rss: Optional[int] = None
        self.save_durations: list[float] = []
        self.sigstopped = False
        self.monitor: Optional[AttemptMonitor] = None
        self._backoff: Optional[asyncio.TimerHandle] = None
        self._prelaunch: Optional[asyncio.Task] = None
        self._exit_noticed: Optional[float] = None   # index refresh before a spawn/decision
        self._exit_fut: Optional[asyncio.Future] = None
        self._flow: Optional[asyncio.Task] = None
        self._flow_kind: Optional[str] = None
        self._ckpt_waiters: list[tuple[set, asyncio.Future]] = []
        self._valid_keys: set[tuple] = set()
        self._save_requested_mono: Optional[float] = None
        self._load_persisted(persisted)

    @property
    def checkpoints(self) -> list:
        """The index, oldest first (trainsup.checkpoint.index.CheckpointInfo)."""
        return self.ckpts.infos

    # -- persistence -----------------------------------------------------------------
    def _load_persisted(self, data: dict) -> None:
        self.attempt = int(data.get("attempt", 0))
        self.restarts = int(data.get("restarts", 0))
        self.last_exit = data.get("last_exit")
        self.pinned = {int(s) for s in data.get("pinned", [])}
        self.tracker.restore(data.get("tracker", {}))
        self.stale_pid = data.get("pid"), data.get("pid_ctime")
        if data.get("state") == S.PREEMPTED.value:
            # After a preemption the job starts again (resuming) when the daemon starts.
            self.restart_reason = "preempt"
        elif data.get("state") in (S.STARTING.value, S.RUNNING.value, S.SAVING.value, S.STOPPING.value,
                                   S.BACKOFF.value):
            # The daemon died under a live attempt: that attempt's process was lost.
            self.restart_reason = "crash"
        self.persisted_state = data.get("state")

    def persist(self) -> None:
        c = self.child
        self.host.save_job(self.name, {
            "attempt": self.attempt, "restarts": self.restarts, "last_exit": self.last_exit,
            "pinned": sorted(self.pinned), "tracker": self.tracker.snapshot(),
            # A SIGSTOPped job is not running, whatever its last transition said.
            "state": "stopped" if self.sigstopped and c else self.state.value,
            "sigstopped": self.sigstopped,
            "pid": c.pid if c else None, "pid_ctime": c.create_time if c else None,
        })

    def event(self, kind: str, **data: Any) -> None:
        self.host.record_event(self.name, kind, data)

    def _set(self, new: State, **data) -> None:
        old = self.state
        if old == new:
            return
        if old not in _ALLOWED[new]:
            raise TransitionError(f"job {self.name}: {old.value} -> {new.value} is not allowed")
        self.state = new
        self.state_since = time.time()
        self.event("state", **{"from": old.value, "to": new.value}, **data)
        self.persist()
        self.host.state_changed(self)

    # -- launching ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.child is not None

    @property
    def busy(self) -> bool:
        """A stop/preempt/restart flow is under way: new notices coalesce into it."""
        return self._flow is not None

    @property
    def active(self) -> bool:
        """Something of this job runs or is about to: a process, a flow, a pending launch."""
        return (self.alive or self._flow is not None or self._prelaunch is not None
                or self.state in (S.BACKOFF, S.STARTING))

    def autostart(self) -> None:
        """At daemon start: a deliberate stop, a finish or a failure stays so across daemon
        restarts; a running or preempted job starts again (resuming)."""
        if self.persisted_state in (S.FAILED.value, S.FINISHED.value, S.STOPPED.value):
            self._set(S(self.persisted_state), restored=True)
        elif self.spec.autostart or self.persisted_state == S.PREEMPTED.value:
            self.start(reason=self.restart_reason)
        else:
            self._set(S.STOPPED)

    def forget_crashes(self) -> None:
        """The job's spec changed: its crash streak was the old spec's."""
        self.tracker.progress()
        self.tracker = RestartTracker(self.spec.restart)

    def retire(self) -> None:
        """This Job object was replaced or removed: no launch may follow, ever."""
        self.retired = True
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        if self._prelaunch is not None:
            self._prelaunch.cancel()
            self._prelaunch = None
        # The checkpoint index stays open until the retiring stop is over: its emergency
        # save must still be seen (the host closes it then).

    def set_config_error(self, error: Optional[str]) -> None:
        self.config_error = error

    def pin(self, step: int) -> None:
        self.pinned.add(step)
        self.persist()
        self.event("pin", step=step)

    def unpin(self, step: int) -> None:
        self.pinned.discard(step)
        self.persist()
        self.event("unpin", step=step)

    def rotation_facts(self) -> RotationFacts:
        return RotationFacts(pinned=frozenset(self.pinned),
                             resumed_from=self.resumed_from if self.alive else None,
                             tmp_grace=self.spec.emergency_save.grace + 60,
                             save_durations=tuple(self.save_durations),
                             grace=self.spec.emergency_save.grace,
                             pids=self._job_pids())

    def _job_pids(self) -> tuple[int, ...]:
        """The job's processes, whose open files rotation must treat as being written."""
        if self.child is None:
            return ()
        return (self.child.pid, *process.descendants(self.child.pid))

    def start(self, reason: str = "manual") -> None:
        """Launch now if idle (or cut a backoff short)."""
        if self.retired or self.alive or self._flow is not None or self._prelaunch is not None:
            return
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        if self.state in (S.FAILED, S.FINISHED, S.STOPPED):
            self.tracker.progress()   # a manual start forgives the crash history
        self.restart_reason = reason if self.attempt else "first"
        self._launch()

    def _resume_point(self) -> Any:
        return self.ckpts.latest_valid()

    def _launch(self, fresh: bool = False) -> None:
        """Move to STARTING and spawn. Unless the index was just refreshed (`fresh`), it is
        refreshed first: a file damaged inside a checkpoint makes no event in the
        (non-recursive) watch, and a damaged checkpoint must never be offered for resume.
        The refresh costs stat calls only (verdicts are cached by file identity)."""
        self._backoff = None
        if self.retired:
            return
        self._set(S.STARTING)
        if fresh or self.spec.checkpoint is None:
            self._spawn_guarded()
            return
        self._prelaunch = self.loop.create_task(self._refresh_then_spawn())

    async def _refresh_then_spawn(self) -> None:
        try:
            await self.ckpts.refresh(for_launch=True)    # re-proves what resume will be handed
        except Exception as e:
            self._internal_error("refreshing the checkpoint index before a launch", e)
            return
        finally:
            self._prelaunch = None
        # A stop that came meanwhile moved the job out of STARTING: then nothing starts.
        if self.state == S.STARTING and self.child is None and not self.retired:
            self._spawn_guarded()

    def _internal_error(self, what: str, e: BaseException) -> None:
        """A bug or a hostile input broke a step of this job: say so with the job named,
        and leave the job in a defined state (failed) rather than wedged."""
        msg = f"internal error while {what}: {e!r}"
        log.error("job %s: %s", self.name, msg, exc_info=e)
        self.error = msg
        self.event("internal-error", error=msg)
        if self.child is None and self.state not in (S.FAILED, S.STOPPED, S.FINISHED, S.PREEMPTED):
            if self.state in (S.PENDING,):
                self._set(S.STOPPED, why=msg)
            else:
                try:
                    self._set(S.FAILED, why=msg)
                except TransitionError:
                    self.state = S.FAILED
                    self.persist()

    def _spawn_guarded(self) -> None:
        try:
            self._spawn()
        except Exception as e:
            self._internal_error("launching", e)

    def _spawn(self) -> None:
        spec = self.spec
        resume = self._resume_point()
        resume_path = str(resume.path) if resume else ""
        argv = list(spec.command)
        if resume and spec.checkpoint is not None:
            argv += [a.replace("{checkpoint}", resume_path) for a in spec.checkpoint.resume_args]
        self.attempt += 1
        if self.attempt > 1:
            self.restarts += 1
        reason = "first" if self.attempt == 1 else self.restart_reason
        extra = {
            "TRAINSUP_JOB": spec.name,
            "TRAINSUP_CHECKPOINT_DIR": str(spec.checkpoint.dir) if spec.checkpoint else "",
            "TRAINSUP_RESUME_FROM": resume_path,
            "TRAINSUP_ATTEMPT": str(self.attempt),
            "TRAINSUP_RESTART_REASON": reason,
            "TRAINSUP_SAVE_SIGNAL": spec.emergency_save.signal,
            "TRAINSUP_HEARTBEAT_FILE": str(self.heartbeat_file),
        }
        env = process.build_env(spec, self.settings, extra)
        if spec.checkpoint is not None:
            try:
                spec.checkpoint.dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.warning("%s: cannot create checkpoint dir %s: %s", self.name, spec.checkpoint.dir, e.strerror)
        try:
            process.prepare_heartbeat(self.heartbeat_file, spec.user, spec.group)
        except (OSError, KeyError) as e:
            log.warning("%s: heartbeat file %s: %s", self.name, self.heartbeat_file, e)
        wfd = -1
        cg: Optional[cgroup.JobCgroup] = None
        containment = self.host.containment
        try:
            wfd = self.log.new_pipe(self.loop)
            cg = containment.create(spec.name, self.attempt) if containment is not None else None
            child = process.spawn(spec, argv, env, wfd, containment, cg)
            spawned_at = time.monotonic()
        except (process.SpawnError, OSError, cgroup.CgroupError) as e:
            if cg is not None:
                cg.remove()
            # EMFILE, ENOMEM, a missing binary: one clean line in status, never a stuck job.
            if isinstance(e, OSError):
                msg = f"{spec.source}: cannot start job {spec.name}: {e.strerror or e}"
            else:
                msg = f"{spec.source}: cannot start job {spec.name}: {e}" if isinstance(e, cgroup.CgroupError) \
                    else str(e)
            self.error = msg
            self.log.note(f"attempt {self.attempt}: cannot start: {msg}")
            self.event("spawn-failed", error=msg, attempt=self.attempt)
            self.log.close_pipe()
            self._after_exit(crashed=True, ran_for=0.0)
            return
        finally:
            if wfd >= 0:
                os.close(wfd)
        crash_point("launched")       # the pid is not durable yet: only the cgroup finds it
        self.child = child
        # The pid is durable before anything else happens: a daemon that dies now finds
        # this process at its next start and stops it instead of launching a second one.
        self.persist()
        self.host.flush()
        crash_point("spawn")
        self.error = None
        self.resumed_from = resume_path or None
        self._exit_fut = self.loop.create_future()
        self.loop.add_reader(child.pidfd, self._on_pidfd, child)
        self.log.note(f"attempt {self.attempt} ({reason}): pid {child.pid}"
                      + (f", resuming from {resume_path}" if resume_path else ""))
        # How long the daemon itself took from noticing the previous exit to this exec
        # (backoff included): the restart overhead a user can check in `history`.
        since_exit = None
        if self._exit_noticed is not None:
            since_exit = round((spawned_at - self._exit_noticed) * 1000, 3)
            self._exit_noticed = None
        self.event("launch", attempt=self.attempt, pid=child.pid, reason=reason, resume_from=resume_path or None,
                   **({"since_exit_ms": since_exit} if since_exit is not None else {}))
        self.monitor = AttemptMonitor(spec, child.pid, self.heartbeat_file, self._on_monitor, child.cgroup)
        self.monitor.start(self.loop)
        self.sigstopped = False
        self._set(S.RUNNING, pid=child.pid)

    @property
    def heartbeat_file(self) -> Path:
        return self.host.heartbeat_dir / self.name

    def _on_monitor(self, kind: str, data: dict) -> None:
        """The attempt monitor's decisions, applied here (it never touches the job)."""
        mon = self.monitor
        if mon is not None:
            self.sigstopped = mon.sigstopped
            self.memory_rss = mon.rss
        if not self.alive or self.busy:
            return
        if kind == "memory":
            self.event("memory", **data)
            self.log.note(f"memory: {data.get('why')}: {data.get('action')}")
            if data.get("action") == "save":
                self.request_save()
            else:
                self.stop(save=True, then_restart="oom", source="oom")
        elif kind == "hang":
            self.event("hang", **data)
            self.log.note(f"no heartbeat or checkpoint for {data.get('silent_s', 0):.0f}s: "
                          f"saving, then restarting")
            self.stop(save=True, then_restart="hang", source="hang")

    # -- exits ---------------------------------------------------------------------------
    def _on_pidfd(self, child: process.Child) -> None:
        self._exit_noticed = time.monotonic()
        self.loop.remove_reader(child.pidfd)
        rc = child.popen.wait()       # waitpid(pid) for this leader only
        child.close()
        self.log.drain()
        self.log.close_pipe()
        self.child = None
        self.memory_rss = None        # status must not show the dead attempt's RSS
        # The leader is gone; descendants it left behind are ended so nothing outlives it.
        leftovers = process.kill_leftovers(child)
        if child.cgroup is None:
            leftovers += process.kill_orphans(self.name, self.host.leader_pids())
        else:
            self.loop.create_task(self._end_cgroup(child.cgroup))
        ex = process.classify_exit(rc)
        mon, self.monitor = self.monitor, None
        if mon is not None:
            mon.stop()
            if mon.oom_killed(ex.signal):
                ex = process.ExitRecord("oom-killed", None, ex.signal, ex.at)
        self.sigstopped = False
        self.last_exit = ex.as_dict()
        ran_for = time.monotonic() - child.started_mono
        self.log.note(f"attempt {self.attempt}: {ex.reason} after {ran_for:.1f}s"
                      + (f" ({leftovers} leftover processes killed)" if leftovers else ""))
        self.event("exit", attempt=self.attempt, pid=child.pid, reason=ex.reason, code=ex.code,
                   signal=ex.signal, ran_for=round(ran_for, 3))
        if self._exit_fut is not None and not self._exit_fut.done():
            self._exit_fut.set_result(ex)
        if self._flow is not None:
            return                     # the stop flow decides what comes next
        if self.spec.checkpoint is None:
            self._after_exit(crashed=(rc != 0), ran_for=ran_for)
        else:
            self._prelaunch = self.loop.create_task(self._refresh_then_decide(rc != 0, ran_for))

    async def _end_cgroup(self, cg: cgroup.JobCgroup, timeout: float = 10.0) -> bool:
        """Kill what is left in the launch's cgroup, wait (inotify on cgroup.events) until
        nothing of it survives, then remove the cgroup."""
        try:
            if cg.populated():
                cg.kill()
            if not await cg.wait_empty(timeout):
                log.error("job %s: cgroup %s still populated %.0fs after cgroup.kill", self.name, cg.path, timeout)
                return False
        except cgroup.CgroupError as e:
            log.error("job %s: %s", self.name, e)
            return False
        cg.remove()
        return True

    async def _refresh_then_decide(self, crashed: bool, ran_for: float) -> None:
        # Checkpoints the attempt committed in its last moments count as progress (the
        # backoff resets), and the resume point is fresh for an immediate relaunch.
        try:
            await self.ckpts.refresh()
        except Exception as e:
            self._internal_error("refreshing the checkpoint index after an exit", e)
            return
        finally:
            self._prelaunch = None
        if self._flow is None and self.child is None and self.state in _ALIVE | {S.STARTING}:
            # The host may know what this exit was (a Slurm preemption), not the policy.
            if await self.host.claims_exit(self):
                return
            if self._flow is None and self.child is None and self.state in _ALIVE | {S.STARTING}:
                self._after_exit(crashed=crashed, ran_for=ran_for, fresh=True)

    def _after_exit(self, *, crashed: bool, ran_for: float, fresh: bool = False) -> None:
        if self.retired:
            return
        try:
            decision = self.tracker.on_exit(crashed=crashed, now=time.monotonic(), ran_for=ran_for)
        except Exception as e:
            self._internal_error("deciding on a restart", e)
            return
        if not decision.restart:
            if decision.final_state == "failed":
                self.error = decision.why
            self._set(S(decision.final_state), why=decision.why)
            return
        oom = bool(self.last_exit and self.last_exit.get("reason") == "oom-killed")
        self.restart_reason = ("oom" if oom else "crash") if crashed else "manual"
        self._set(S.BACKOFF, delay=round(decision.delay, 3), why=decision.why)
        if decision.delay <= 0:
            self._launch(fresh=fresh)
        else:
            self._backoff = self.loop.call_later(decision.delay, self._launch)

    # -- checkpoints -------------------------------------------------------------------
    def on_checkpoints(self, infos: list, error: Optional[str] = None) -> None:
        """The index for this job's dir was refreshed (watcher event or rescan); the
        service has already replaced `checkpoints`, `_valid_keys` is the previous one."""
        before = self._valid_keys
        self._valid_keys = {_ckpt_key(i) for i in infos if i.valid}
        new_valid = [i for i in infos if i.valid and _ckpt_key(i) not in before]
        for info in new_valid:
            took = None
            if self._save_requested_mono is not None:
                took = time.monotonic() - self._save_requested_mono
                self.save_durations = (self.save_durations + [took])[-5:]
                self._save_requested_mono = None
            self.event("checkpoint", step=info.step, path=str(info.path), bytes=info.bytes,
                       reason=info.reason, **({"took_s": round(took, 3)} if took is not None else {}))
        if new_valid:
            self.tracker.progress()
        valid_now = {_ckpt_key(i) for i in infos if i.valid}
        for known, fut in list(self._ckpt_waiters):
            if not fut.done() and valid_now - known:
                fut.set_result(True)
        self._ckpt_waiters = [(k, f) for k, f in self._ckpt_waiters if not f.done()]

    def _new_checkpoint_future(self) -> asyncio.Future:
        fut = self.loop.create_future()
        self._ckpt_waiters.append(({_ckpt_key(i) for i in self.checkpoints if i.valid}, fut))
        return fut

    def request_save(self) -> tuple[list[int], asyncio.Future]:
        """Ask the job for a checkpoint; returns the pids signalled and a future that
        resolves when a valid checkpoint newer than this request is indexed."""
        fut = self._new_checkpoint_future()
        if not self.child:
            return [], fut
        signum = process.signal_number(self.spec.emergency_save.signal)
        sent = process.deliver_save_signal(self.child, signum)
        self._save_requested_mono = time.monotonic()
        self.event("save-requested", pids=sent)
        if not sent:
            msg = (f"no process of job {self.name} catches {self.spec.emergency_save.signal}: "
                   f"it cannot do emergency saves")
            self.log.note(msg)
            log.warning(msg)
        return sent, fut

    # -- the stop flow -------------------------------------------------------------------
    def stop(self, *, save: bool = True, final: State = S.STOPPED, grace: Optional[float] = None,
             deadline_wall: Optional[float] = None, then_restart: Optional[str] = None,
             source: str = "manual") -> asyncio.Task:
        """Save (if asked), confirm, then stop. Repeated requests coalesce into the flow
        already running."""
        if self._flow is not None:
            return self._flow
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        self._flow_kind = source
        self._flow = self.loop.create_task(
            self._stop_flow(save, final, grace, deadline_wall, then_restart, source))
        self._flow.add_done_callback(self._flow_done)
        return self._flow

    def _flow_done(self, task: asyncio.Task) -> None:
        self._flow = None
        self._flow_kind = None
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: stop flow failed: %r", self.name, task.exception())

    async def _wait_exit(self, timeout: float) -> bool:
        if self._exit_fut is None or self._exit_fut.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._exit_fut), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _stop_flow(self, save, final, grace, deadline_wall, then_restart, source) -> dict:
        spec = self.spec
        notice_at = time.time()
        outcome: dict[str, Any] = {"source": source, "at": notice_at}
        if deadline_wall is not None:
            outcome["deadline"] = deadline_wall
        self.last_notice = outcome
        if self._prelaunch is not None:
            self._prelaunch.cancel()
            self._prelaunch = None
        if not self.alive:
            if self.state in (S.BACKOFF, S.PENDING, S.STARTING) or (self.state in _ALIVE and not self.child):
                self._set(final if final != S.FAILED else S.STOPPED)
            outcome["outcome"] = "not running"
            return outcome
        grace = spec.emergency_save.grace if grace is None else grace
        if deadline_wall is not None:
            grace = max(0.0, min(grace, deadline_wall - notice_at))
        t0 = time.monotonic()
        # Without a checkpoint dir no save can be confirmed: SIGTERM ("save if you can
        # and exit") is the whole request.
        if save and spec.checkpoint is not None:
            if self.save_durations and max(self.save_durations) > grace:
                # Say so before it fails: the recent saves took longer than the time left.
                outcome["warning"] = (f"recent saves took up to {max(self.save_durations):.1f}s, "
                                      f"longer than the {grace:.1f}s left")
                self.event("save-too-slow", took_s=round(max(self.save_durations), 3), time_left_s=round(grace, 3))
            self._set(S.SAVING, source=source)
            sent, fut = self.request_save()
            self.host.emergency_save_started(grace)
            try:
                if sent and self._exit_fut is not None:
                    waiters = [fut, asyncio.shield(self._exit_fut)]
                    done, _ = await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
                    if fut in done:
                        latest = self._resume_point()
                        outcome.update(outcome="saved", step=getattr(latest, "step", None),
                                       save_s=round(time.monotonic() - t0, 3))
                    elif done:
                        outcome.update(outcome="exited before a new checkpoint")
                    else:
                        outcome.update(outcome=f"no save within {grace:g}s")
                else:
                    outcome.update(outcome="job does not catch the save signal")
            finally:
                if not fut.done():
                    fut.cancel()
        self._set(S.STOPPING, source=source)
        cg = self.child.cgroup if self.child else None
        if self.alive:
            if self.child:
                self.child.refresh_tree()
                self.child.signal_group(signal.SIGTERM)
            if not await self._wait_exit(spec.stop_timeout):
                if self.child:
                    self.child.signal_group(signal.SIGKILL)
                    process.kill_leftovers(self.child)
                    outcome["killed"] = True
                await self._wait_exit(10.0)
        if cg is not None:
            # Stopped means nothing of the job survives: its cgroup is empty.
            await self._end_cgroup(cg)
        outcome["stop_s"] = round(time.monotonic() - t0, 3)
        self.event("notice", **outcome)
        self.last_notice = outcome
        if then_restart:
            self.restart_reason = then_restart
            self._launch()
        else:
            self._set(final)
        return outcome

    # -- views ---------------------------------------------------------------------------
    def status(self) -> dict:
        latest = self._resume_point()
        valid = sum(1 for i in self.checkpoints if i.valid)
        invalid = sum(1 for i in self.checkpoints if not i.valid and not i.in_progress)
        total = sum(i.bytes for i in self.checkpoints)
        c = self.child
        now = time.time()
        if c is not None:
            self.sigstopped = is_stopped(c.pid)
        if c is not None and self.monitor is not None and not self.spec.memory.limit:
            try:
                self.memory_rss = self.monitor.sample_rss(max_age=1.0)   # at most once a second
            except Exception:
                pass
        quota = self.spec.checkpoint.quota if self.spec.checkpoint else None
        return {
            "name": self.name,
            # A SIGSTOPped job is not running, whatever its last transition said.
            "state": "stopped" if self.sigstopped and c else self.state.value,
            "sigstopped": self.sigstopped,
            "pid": c.pid if c else None,
            "uptime_s": round(now - c.started_wall, 1) if c else None,
            "since": self.state_since,
            "attempt": self.attempt,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "restart_reason": self.restart_reason,
            "resumed_from": self.resumed_from,
            "checkpoint": {
                "latest": str(latest.path) if latest else None,
                "step": latest.step if latest else None,
                "age_s": round(now - latest.mtime, 1) if latest and latest.mtime else None,
                "valid": valid, "invalid": invalid, "bytes": total, "quota": quota,
                "over_quota": self.ckpts.over_quota,
                "error": self.ckpts.error,
            } if self.spec.checkpoint else None,
            "memory": {"rss": self.memory_rss, "limit": self.spec.memory.limit},
            "last_notice": self.last_notice,
            "warnings": list(self.ckpts.warnings),
            "error": self.error,
            "config_error": self.config_error,
            "source": str(self.spec.source),
            "user": self.spec.user,
            "containment": c.containment if c is not None else
            (self.host.containment.kind if self.host.containment is not None else cgroup.PROCESS_GROUP),
        }
