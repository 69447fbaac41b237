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
import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import contract, fdbudget
from ..checkpoint import confirm
from ..checkpoint.index import CheckpointInfo
from ..control.protocol import table_row
from ..crashpoints import crash_point
from ..spec import DaemonSpec, JobSpec
from . import notice_file as jobnotice
from .backoff import RestartTracker
from .checkpoints import JobCheckpoints, RotationFacts
from .goodput import GoodputBook
from .joblog import JobLog
from .launch import cgroup, process, shim
from .monitor import AttemptMonitor
from .notices.hang import is_stopped
from .progress import FirstStep
from .rowgen import RowFields

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
    # From PENDING only when a restarted daemon takes over a job still running (adopt).
    S.RUNNING: {S.STARTING, S.SAVING, S.PENDING},
    S.SAVING: {S.RUNNING},
    S.STOPPING: {S.RUNNING, S.SAVING, S.STARTING},
    S.BACKOFF: {S.STARTING, S.RUNNING, S.SAVING},
    S.STOPPED: _ALIVE | {S.BACKOFF, S.PENDING, S.STARTING, S.FAILED, S.FINISHED, S.PREEMPTED},
    S.PREEMPTED: _ALIVE | {S.BACKOFF, S.STARTING, S.PENDING},
    # From PENDING only when restored at daemon start (or when re-added by a reload):
    # a job that finished or failed stays so, and the daemon must start regardless.
    S.FINISHED: {S.RUNNING, S.SAVING, S.PENDING},
    S.FAILED: {S.STARTING, S.RUNNING, S.SAVING, S.STOPPING, S.PENDING},
    S.PENDING: set(),
    S.INVALID: set(),
}

_CLEANUPS: set[asyncio.Task] = set()       # cgroup removals under way
# Seconds `status` shows a job's last notice (then it is history); tests shorten it.
NOTICE_SHOWN_FOR = float(os.environ.get("TRAINSUP_NOTICE_SHOWN_FOR", "900"))
# `status` reads a job's /proc entries (stop state, RSS, signal handlers) at most this
# often: 200 jobs polled back to back must not walk 200 process trees per request.
PROC_MAX_AGE = 1.0


@dataclass(frozen=True)
class ProcSample:
    """What `status` shows of a running attempt from /proc and its cgroup, read off the loop."""
    pid: int
    stopped: bool
    rss: int | None
    catches: bool | None     # None: not re-read this time


class TransitionError(RuntimeError):
    pass


class JobHost(Protocol):
    """What a Job may ask of the daemon that runs it."""
    loop: asyncio.AbstractEventLoop
    containment: cgroup.Containment | None   # None: process group only
    heartbeat_dir: Path

    def record_event(self, job: str, kind: str, data: dict) -> None: ...
    def save_job(self, job: str, data: dict) -> None: ...
    def flush(self) -> None: ...
    def state_changed(self, job: Job) -> None: ...
    def emergency_save_started(self, grace: float) -> None: ...
    def leader_pids(self) -> list[int]: ...
    async def claims_exit(self, job: Job) -> bool: ...


# A job installs its save-signal handler after its imports (trainsup.save_requested() on
# its first step): status warns only once an attempt has run this long without one.
CATCH_GRACE_S = float(os.environ.get("TRAINSUP_TEST_CATCH_GRACE", "30"))


def _ago(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _reported_step(heartbeat: Path, since_wall: float) -> int | None:
    """The step a job wrote into its heartbeat file during this attempt (the contract's
    heartbeat: a job may write its current step there), else None. Read once, at exit;
    never blocking (the job can put a FIFO there) and never past HEARTBEAT_READ bytes."""
    try:
        # not a job path: the daemon's heartbeat file (the job writes it: O_NONBLOCK|O_NOFOLLOW, fstat, capped read)
        fd = os.open(heartbeat, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mtime < since_wall - 1.0:
            return None            # not a file, or written by an earlier attempt
        return contract.parse_heartbeat(os.read(fd, contract.HEARTBEAT_READ))
    except OSError:
        return None
    finally:
        os.close(fd)


def _ckpt_key(info: CheckpointInfo) -> tuple:
    return (str(info.path), info.step, info.mtime, info.bytes)


class Job(RowFields):
    # What status_row shows (see rowgen.py): assigning any of these re-encodes the row.
    ROW_FIELDS = frozenset({"spec", "state", "child", "restarts", "error", "last_notice", "memory_rss",
                            "sigstopped", "_catch_seen", "config_error",
                            "supervised_since"})

    def __init__(self, spec: JobSpec, host: JobHost, settings: DaemonSpec, ckpts: JobCheckpoints,
                 persisted: dict, *, spawn: Callable[..., process.Child] = process.spawn,
                 clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self._spawn_process = spawn       # process.spawn; unit tests hand in a fake child
        self.clock = clock                # monotonic: restart decisions never see wall time
        self.host = host
        self.loop = host.loop
        self.settings = settings
        self.ckpts = ckpts
        ckpts.on_index = self.on_checkpoints
        self.name = spec.name
        self.state = S.PENDING
        self.state_since = time.time()
        self.retired = False
        self.config_error: str | None = None   # the job's file broke on reload; still running
        self.child: process.Child | None = None
        self.log = JobLog(settings.log_dir / f"{spec.name}.log",
                          settings.log_max_bytes, settings.log_backups)
        self.tracker = RestartTracker(spec.restart)
        self.attempt = 0
        self.restarts = 0
        self.last_exit: dict | None = None
        self.error: str | None = None
        self.restart_reason = "first"
        self.resumed_from: str | None = None
        self.pinned: set[int] = set()
        self.last_notice: dict | None = None
        self.memory_rss: int | None = None
        self.save_durations: list[float] = []
        self.sigstopped = False
        self.monitor: AttemptMonitor | None = None
        self._backoff: asyncio.TimerHandle | None = None
        self._prelaunch: asyncio.Task | None = None
        self._exit_noticed: float | None = None   # index refresh before a spawn/decision
        self._exit_fut: asyncio.Future | None = None
        self._flow: asyncio.Task | None = None
        self._flow_kind: str | None = None
        self._ckpt_waiters: list[tuple[confirm.SaveRequest, asyncio.Future]] = []
        self._valid_keys: set[tuple] = set()
        self._save_requested_mono: float | None = None
        self._notices = 0                 # notices written this daemon run (their ids)
        self.notice_id: str | None = None   # the notice the job was last signalled with
        self._notice_path: Path | None = None   # TRAINSUP_NOTICE_FILE of the running attempt
        self._catch_seen: tuple[int, bool] | None = None   # (pid, catches the save signal) for status
        self._catch_at = float("-inf")                      # monotonic: when that was read
        self._last_step: int | None = None          # the step the last attempt reported
        self._attempt_top: int | None = None        # its newest checkpoint's step (also a report)
        self._attempt_wall = 0.0                    # when the current (or last) attempt started
        self._first_step: FirstStep | None = None   # the running attempt's first-step watch
        self.goodput = GoodputBook()                # fed every event (goodput.py)
        self._proc_seen: tuple[int, float] = (0, float("-inf"))   # (pid, when) of the last /proc read
        self._ck_summary: tuple[Any, tuple] = (None, ())         # (infos list, its summary)
        self._row: tuple[tuple, tuple[bytes, bytes]] = ((), (b"", b""))   # (what it shows, row and notes)
        self.mirror: Any = None       # mirror.JobMirror with checkpoint.mirror (the host attaches it)
        self._spec_id: str | None = None
        self._tree: str | None = None        # cgroup.tree_name of the state dir, for the shim's marker
        self.supervised_since: float | None = None  # when this daemon took charge of the running attempt
        self._flow_intent: dict | None = None      # the stop flow under way, persisted (adoption resumes it)
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
        self.persisted = data           # what adoption reads: the shim, the flow, the spec's id
        self.goodput = GoodputBook.restore(data.get("goodput"))
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
            # What the next daemon needs to take this attempt over (trainsup.daemon.adoption).
            "shim": c.shim_pid if c else None, "started": c.started_wall if c else None,
            "resumed_from": self.resumed_from if c else None, "restart_reason": self.restart_reason,
            "flow": self._flow_intent if self.state in (S.SAVING, S.STOPPING) else None,
            "spec_id": self.spec_id,
            "goodput": self.goodput.snapshot(),
        })

    def event(self, kind: str, **data: Any) -> None:
        self.goodput.feed({**data, "at": time.time(), "kind": kind})
        self.host.record_event(self.name, kind, data)

    def _set(self, new: State, **data: Any) -> None:
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
        if self.mirror is not None and new in _IDLE:
            self.mirror.job_idle()        # last uploads, then the lease goes back

    def lease_lost(self, why: str) -> None:
        """Another machine took this job's lease over (fencing): stop training here."""
        self.error = why
        self.log.note(f"mirror: {why}; stopping")
        if self.active:
            self.stop(save=True, final=S.STOPPED, source="lease-lost")

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

    def set_config_error(self, error: str | None) -> None:
        self.config_error = error

    def note_notice(self, notice: dict) -> None:
        """A notice the host acted on for this job (a machine-wide warning, a Slurm end
        of step): `status` shows it as the job's last notice."""
        self.last_notice = notice

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
                             pids=self._job_pids(),
                             unuploaded=self.mirror.unuploaded if self.mirror is not None else frozenset())

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
        # Fresh (an immediate relaunch, the index refreshed after the exit): straight on,
        # unless the last attempt left a save half-written (found with backoff 0: HF's
        # get_last_checkpoint then picked the half-written checkpoint-N/), or the dir is one
        # where only a re-hash proves the resume point (tmpfs: the refresh after the exit
        # trusted fingerprints, and a damaged checkpoint was offered), or the mirror has a
        # lease to take or a restore to consider first.
        if self.spec.checkpoint is None or (fresh and not self.ckpts.has_interrupted(self.pinned)
                                            and not self.ckpts.reproof_needed()
                                            and not (self.mirror is not None and self.mirror.needs_prelaunch())):
            self._spawn_guarded()
            return
        self._prelaunch = self.loop.create_task(
            self._refresh_then_spawn(refresh=not fresh or self.ckpts.reproof_needed()))

    async def _refresh_then_spawn(self, refresh: bool = True) -> None:
        try:
            if self.mirror is not None:
                # the lease, then a restore from the store: before the resume point is chosen
                await self.mirror.before_launch()
            if refresh:
                await self.ckpts.refresh(for_launch=True)    # re-proves what resume will be handed
            if self.child is None:
                # No writer is left: a save the last attempt left half-written must not be
                # what the framework's own "latest" logic picks up next.
                for info, where in await self.ckpts.move_aside_interrupted(self.pinned):
                    self.event("moved-aside", path=str(info.path), to=where, why=info.invalid_reason)
                    self.log.note(f"moved aside an interrupted save: {info.path} ({info.invalid_reason})")
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
        resume_path = str(resume.resume_path) if resume else ""   # HF dir, .ckpt, Paddle/TF prefix, Keras file
        argv = list(spec.command)
        if resume and spec.checkpoint is not None:
            argv += [a.replace("{checkpoint}", resume_path) for a in spec.checkpoint.resume_args]
        self.attempt += 1
        reason = "first" if self.attempt == 1 else self.restart_reason
        if reason not in ("first", "manual"):
            self.restarts += 1          # what the supervisor did on its own; a user's start is not one
        extra = {
            contract.JOB: spec.name,
            contract.CHECKPOINT_DIR: str(spec.checkpoint.dir) if spec.checkpoint else "",
            contract.RESUME_FROM: resume_path,
            contract.ATTEMPT: str(self.attempt),
            contract.RESTART_REASON: reason,
            contract.SAVE_SIGNAL: spec.emergency_save.signal,
            contract.HEARTBEAT_FILE: str(self.heartbeat_file),
        }
        if spec.checkpoint is not None:
            try:
                # beside the heartbeat: the state dir is root's 0750, out of a `user:` job's reach
                self._notice_path = jobnotice.prepare(self.host.heartbeat_dir, self.name, spec.owner())
                jobnotice.clear(self._notice_path)
                extra[contract.NOTICE_FILE] = str(self._notice_path)
            except (OSError, KeyError) as e:
                self._notice_path = None     # the old flow: signal, then SIGTERM
                log.warning("%s: notice dir: %s", self.name, e)
        env = process.build_env(spec, self.settings, extra)
        if spec.checkpoint is not None:
            # created owned by the job's user, never through a symlink (checkpoint/custody.py)
            problem = self.ckpts.ensure_dir()
            if problem:
                log.warning("%s: checkpoint dir %s: %s", self.name, spec.checkpoint.dir, problem)
        try:
            process.prepare_heartbeat(self.heartbeat_file, spec.owner())
            self._arm_first_step(self.attempt)
        except (OSError, KeyError) as e:
            log.warning("%s: heartbeat file %s: %s", self.name, self.heartbeat_file, e)
        wfd = -1
        cg: cgroup.JobCgroup | None = None
        containment = self.host.containment
        try:
            fdbudget.check()      # never the fds `status` needs: one line instead (fdbudget.py)
            plan = self._shim_plan()
            if plan is None:
                wfd = self.log.new_pipe(self.loop)
            cg = containment.create(spec.name, self.attempt) if containment is not None else None
            child = self._spawn_process(spec, argv, env, wfd, containment, cg, plan=plan)
            spawned_at = self.clock()
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
            self._disarm_first_step()
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
        self.log.shim_writes = child.shim_pid is not None
        self.supervised_since = time.time()
        self.resumed_from = resume_path or None
        self._attempt_wall = child.started_wall
        # The pid is durable before anything else happens: a daemon that dies now finds
        # this process at its next start and takes it over instead of launching another.
        self.persist()
        self.host.flush()
        crash_point("spawn")
        if self.attempt > 1:
            # Its exit is in the database now (committed with this launch): the previous
            # attempt's status file has told all it had to.
            shim.discard_status(shim.status_path(self.settings.state_dir, f"{self.name}.{self.attempt - 1}"))
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
        lost: dict[str, int] = {}
        if self._last_step is not None:
            # Work the interrupted attempt did past the checkpoint this one resumes from
            # (unknown when that checkpoint has no step number). A checkpoint indexed after
            # the exit (saved in its last moments) is a report of the step reached too.
            reached = max(self._last_step, self._attempt_top or 0)
            back_to = 0 if resume is None else resume.step
            if back_to is not None:
                lost["steps_lost"] = max(0, reached - back_to)
            self._last_step = None
        self._attempt_top = None
        if resume is not None and resume.step is not None:
            lost["resume_step"] = resume.step
        elif resume is None and spec.checkpoint is not None:
            lost["from_scratch"] = True   # told to start over: the last attempt's work is redone
        self.event("launch", attempt=self.attempt, pid=child.pid, reason=reason, resume_from=resume_path or None,
                   **({"since_exit_ms": since_exit} if since_exit is not None else {}), **lost)
        self.monitor = AttemptMonitor(spec, child.pid, self.heartbeat_file, self._on_monitor, child.cgroup)
        self.monitor.start(self.loop)
        self.sigstopped = False
        self._set(S.RUNNING, pid=child.pid)

    @property
    def heartbeat_file(self) -> Path:
        return self.host.heartbeat_dir / self.name

    @property
    def spec_id(self) -> str:
        """Names this spec: a job file changed while no daemon ran is seen as changed."""
        if self._spec_id is None:
            import hashlib
            self._spec_id = hashlib.sha256(repr(self.spec).encode()).hexdigest()[:16]
        return self._spec_id

    def _shim_plan(self) -> shim.Plan | None:
        """What the shim of this launch needs, or None without one (shim.why_unavailable)."""
        if not shim.enabled():
            return None
        if self._tree is None:
            self._tree = cgroup.tree_name(self.settings.state_dir)
            for d in (shim.exits_dir(self.settings.state_dir), self.log.path.parent):
                d.mkdir(parents=True, exist_ok=True)
        name = f"{self.name}.{self.attempt}"
        return shim.Plan(shim.tree_marker(self._tree, name), shim.status_path(self.settings.state_dir, name),
                         self.log.path, self.log.max_bytes, self.log.backups)

    def _arm_first_step(self, attempt: int) -> None:
        self._disarm_first_step()
        fs = FirstStep(self.loop, self.heartbeat_file, lambda step: self._on_first_step(attempt, step))
        if fs.arm():
            self._first_step = fs

    def _disarm_first_step(self) -> None:
        if self._first_step is not None:
            self._first_step.cancel()
            self._first_step = None

    def _on_first_step(self, attempt: int, step: int | None) -> None:
        """The attempt wrote its heartbeat for the first time: it trains again."""
        self._first_step = None
        c = self.child
        if c is None or attempt != self.attempt:
            return                     # the attempt it was armed for is over
        self.event("first-step", attempt=attempt, step=step, after_s=round(time.monotonic() - c.started_mono, 3))

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
        self._exit_noticed = self.clock()
        self.loop.remove_reader(child.pidfd)
        ex = process.reap(child)      # waitpid(pid) for this leader only; under a shim, its status file
        child.close()
        self.log.drain()
        self.log.close_pipe()
        self._ended(child, ex)

    def _ended(self, child: process.Child, ex: process.ExitRecord, late: bool = False,
               recorded: bool = False) -> None:
        """The attempt of `child` ended as `ex`: seen now, or `late`, while no daemon ran
        (then `recorded` says whether a daemon killed since put it in the history)."""
        self.log.shim_writes = False
        self.child = None
        self.memory_rss = None        # status must not show the dead attempt's RSS
        # The leader is gone; descendants it left behind are ended so nothing outlives it.
        leftovers = process.kill_leftovers(child)
        if child.cgroup is None:
            leftovers += process.kill_orphans(self.name, self.host.leader_pids())
        try:
            self._after_ended(child, ex, late, recorded, leftovers)
        finally:
            if child.cgroup is not None:
                # Leftovers got cgroup.kill above; waiting for empty and rmdir come after
                # the relaunch decision's first step (call_soon: queued behind it, as this
                # is scheduled after that step), off its path.
                self.loop.call_soon(self._start_end_cgroup, child.cgroup)

    def _after_ended(self, child: process.Child, ex: process.ExitRecord, late: bool, recorded: bool,
                     leftovers: int) -> None:
        mon, self.monitor = self.monitor, None
        if mon is not None:
            mon.stop()
            if mon.oom_killed(ex.signal):
                ex = process.ExitRecord("oom-killed", None, ex.signal, ex.at)
        elif late and ex.signal == "SIGKILL" and child.cgroup is not None and child.cgroup.memory()[1]:
            # No monitor saw it: the launch's own cgroup counted an OOM kill (it had none at launch).
            ex = process.ExitRecord("oom-killed", None, ex.signal, ex.at)
        self.sigstopped = False
        self.last_exit = {**ex.as_dict(), "attempt": self.attempt}
        ran_for = (ex.at - child.started_wall) if late else self.clock() - child.started_mono
        crashed = ex.code != 0
        self._disarm_first_step()
        if not recorded:
            self.log.note(f"attempt {self.attempt}: {ex.reason} after {ran_for:.1f}s"
                          + (" (while no daemon ran)" if late else "")
                          + (f" ({leftovers} leftover processes killed)" if leftovers else ""))
            # The job's own reports at the moment of exit: the step in its heartbeat (rewritten
            # at every step by trainsup.training) and its newest checkpoint of this attempt.
            # A job that writes no heartbeat reports no step (its loss stays unknown).
            hb = _reported_step(self.heartbeat_file, child.started_wall)
            self._last_step = max(hb, self._attempt_top or 0) if hb is not None else None
            self.event("exit", attempt=self.attempt, pid=child.pid, reason=ex.reason, code=ex.code,
                       signal=ex.signal, ran_for=round(ran_for, 3),
                       **({"last_step": self._last_step} if self._last_step is not None else {}),
                       **({"exited_at": ex.at, "while_no_daemon": True} if late else {}))
            # With the event, in the same commit: a daemon killed before deciding what
            # follows finds the exit recorded and does not record it twice.
            self.persist()
        if self._exit_fut is not None and not self._exit_fut.done():
            self._exit_fut.set_result(ex)
        if self._flow is not None:
            return                     # the stop flow decides what comes next
        if self._flow_intent is not None and late:
            self._finish_flow_late()   # a stop the dead daemon had begun: its outcome
            return
        if self.spec.checkpoint is None:
            self._after_exit(crashed=crashed, ran_for=ran_for)
        else:
            self._prelaunch = self.loop.create_task(self._refresh_then_decide(crashed, ran_for, child.started_wall))

    # -- taking over after a daemon restart (trainsup.daemon.adoption finds and verifies) ---
    def adopt(self, child: process.Child, attempt: int, via: str) -> None:
        """Supervise an attempt an earlier daemon launched, still running: the same
        attempt and counters, no save asked, no relaunch; its monitors start again, and a
        stop that daemon had begun is carried on."""
        was = self.persisted_state
        data = self.persisted
        behind = attempt > self.attempt      # the database never heard of this launch
        unrecorded = behind or was in (None, S.STARTING.value, S.PENDING.value)
        self.restart_reason = data.get("restart_reason") or self.restart_reason
        reason = "first" if attempt == 1 else self.restart_reason
        if behind and reason not in ("first", "manual"):
            self.restarts += 1           # the launch the dead daemon made, never committed
        self.attempt = attempt
        self.child = child
        self.log.shim_writes = True
        self.supervised_since = time.time()
        self.resumed_from = (None if behind else data.get("resumed_from")) or shim.environ_of(
            child.pid, (contract.RESUME_FROM,)).get(contract.RESUME_FROM) or None
        if self.spec.checkpoint is not None:
            self._notice_path = jobnotice.path_of(self.settings.state_dir, self.name)
            # Notice ids go on from the last one written: an old ack must not match a new notice.
            self._notices = jobnotice.last_count(self._notice_path, attempt)
        self._exit_fut = self.loop.create_future()
        self.loop.add_reader(child.pidfd, self._on_pidfd, child)
        self.monitor = AttemptMonitor(self.spec, child.pid, self.heartbeat_file, self._on_monitor, child.cgroup)
        self.monitor.start(self.loop)
        if unrecorded:
            # The dead daemon launched it and died before recording the launch.
            self.event("launch", attempt=attempt, pid=child.pid, reason=reason, resume_from=self.resumed_from,
                       recorded="when taken over")
        self.event("adopted", attempt=attempt, pid=child.pid, shim=child.shim_pid, via=via, found="running",
                   cgroup=child.cgroup.name if child.cgroup is not None else None,
                   started=round(child.started_wall, 3), state_was=was)
        self.log.note(f"attempt {attempt}: pid {child.pid} taken over by trainsup daemon pid {os.getpid()} "
                      f"(after a daemon {via})")
        self._set(S.RUNNING, pid=child.pid, adopted=True)
        if self.mirror is not None:
            self.mirror.adopted()         # the lease again (its own), then the uploads go on
        flow = data.get("flow") if was in (S.SAVING.value, S.STOPPING.value) else None
        if isinstance(flow, dict) and flow.get("final") in {s.value for s in State}:
            # The dead daemon was stopping this job: finish what it began.
            self.stop(save=was == S.SAVING.value, final=S(flow["final"]),
                      then_restart=flow.get("then_restart"), source=str(flow.get("source") or "daemon-stop"))
        elif data.get("spec_id") not in (None, self.spec_id):
            # Its file changed while no daemon ran: what a reload would have done then.
            self.event("changed-while-down", attempt=attempt)
            self.stop(save=True, then_restart="manual", source="reload")

    def exited_unseen(self, child: process.Child, status: shim.ExitStatus, attempt: int, via: str,
                      recorded: bool) -> None:
        """An attempt that ended while no daemon ran, as its shim recorded it: handled as
        if it had been seen (a crash restarts from the latest valid checkpoint, exit 0
        finishes), its exit recorded once."""
        self.attempt = attempt
        self.supervised_since = time.time()
        ex = process.classify_exit(status.returncode)
        ex.at = status.at
        self.event("adopted", attempt=attempt, pid=child.pid, via=via, found="exited", code=ex.code,
                   signal=ex.signal, exited_at=status.at, state_was=self.persisted_state)
        self.state = S.RUNNING            # what it was when that daemon died (not a new transition)
        flow = self.persisted.get("flow")
        if isinstance(flow, dict) and self.persisted_state in (S.SAVING.value, S.STOPPING.value):
            self._flow_intent = flow
        self._ended(child, ex, late=True, recorded=recorded)

    def _finish_flow_late(self) -> None:
        intent, self._flow_intent = self._flow_intent or {}, None
        if intent.get("then_restart"):
            self.restart_reason = intent["then_restart"]
            self._launch()
        else:
            try:
                self._set(S(intent.get("final") or S.STOPPED.value))
            except (ValueError, TransitionError):
                self._set(S.STOPPED)

    def _start_end_cgroup(self, cg: cgroup.JobCgroup) -> None:
        task = self.loop.create_task(self._end_cgroup(cg))
        _CLEANUPS.add(task)                  # a task only weakly referenced may vanish
        task.add_done_callback(_CLEANUPS.discard)

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

    async def _refresh_then_decide(self, crashed: bool, ran_for: float, started_wall: float = 0.0) -> None:
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
                saved = self._stopped_elsewhere(started_wall)
                if saved is not None:
                    self._rejoin(saved)
                else:
                    self._after_exit(crashed=crashed, ran_for=ran_for, fresh=True)

    def _stopped_elsewhere(self, started_wall: float) -> CheckpointInfo | None:
        """The checkpoint that says this attempt ended for a preemption no notice of this
        daemon asked for (another node's: the ranks of a multi-node job agree on a save
        and stop together), or None. Read from the newest valid checkpoint, not from the
        exit code: its manifest's reason is `preempt` (trainsup's helper writes it) and it
        was written during this attempt, shortly before the exit."""
        latest = self.ckpts.latest_valid()
        if latest is None or latest.reason != "preempt" or not latest.mtime:
            return None
        recent = self.spec.emergency_save.grace + self.spec.stop_timeout + 60
        if latest.mtime < started_wall - 1 or time.time() - latest.mtime > recent:
            return None
        return latest

    def _rejoin(self, saved: CheckpointInfo) -> None:
        """Relaunch at once from that checkpoint: not a crash (no backoff, no crash count),
        not the end of the run, whatever the exit code."""
        if self.retired:
            return
        self.event("stopped-elsewhere", step=saved.step, path=str(saved.path),
                   code=(self.last_exit or {}).get("code"))
        self.log.note(f"attempt {self.attempt}: stopped by a preemption elsewhere "
                      f"(saved step {saved.step}); relaunching to rejoin")
        decision = self.tracker.on_stopped_elsewhere(self.clock())
        if not decision.restart:
            self.error = decision.why
            self._set(S(decision.final_state), why=decision.why)
            return
        self.restart_reason = "preempt"
        self._set(S.BACKOFF, delay=0.0, why=decision.why)
        self._launch(fresh=True)

    def _after_exit(self, *, crashed: bool, ran_for: float, fresh: bool = False) -> None:
        if self.retired:
            return
        try:
            decision = self.tracker.on_exit(crashed=crashed, now=self.clock(), ran_for=ran_for)
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
    def on_checkpoints(self, infos: list, error: str | None = None) -> None:
        """The index for this job's dir was refreshed (watcher event or rescan); the
        service has already replaced `checkpoints`, `_valid_keys` is the previous one."""
        before = self._valid_keys
        self._valid_keys = {_ckpt_key(i) for i in infos if i.valid}
        new_valid = [i for i in infos if i.valid and _ckpt_key(i) not in before]
        for info in new_valid:
            # Written by the current (or just ended) attempt, not found by the first scan
            # at daemon start: a report of the step that attempt reached.
            if info.step is not None and self._attempt_wall and info.mtime >= self._attempt_wall - 1:
                self._attempt_top = max(self._attempt_top or 0, info.step)
            took = None
            if self._save_requested_mono is not None:
                took = time.monotonic() - self._save_requested_mono
                self.save_durations = (self.save_durations + [took])[-5:]
                self._save_requested_mono = None
            self.event("checkpoint", step=info.step, path=str(info.path), bytes=info.bytes,
                       reason=info.reason, **({"took_s": round(took, 3)} if took is not None else {}),
                       **({"save_s": info.save_s} if info.save_s is not None else {}),
                       **({"mtime": round(info.mtime, 3)} if info.mtime else {}))
        if new_valid:
            self.tracker.progress()
        if self.mirror is not None:
            self.mirror.on_index(infos)
        for req, fut in list(self._ckpt_waiters):
            # a new save confirms, never an old checkpoint found late (confirm.py)
            info = confirm.confirmation(infos, req) if not fut.done() else None
            if info is not None:
                fut.set_result(info)
        self._ckpt_waiters = [(k, f) for k, f in self._ckpt_waiters if not f.done()]

    def _new_checkpoint_future(self) -> asyncio.Future:
        """Resolves with the checkpoint that confirms a save asked for now."""
        fut = self.loop.create_future()
        self._ckpt_waiters.append((confirm.save_request(self.checkpoints, time.time()), fut))
        return fut

    def request_save(self, kind: str = "checkpoint", deadline: float | None = None) -> tuple[list[int], asyncio.Future]:
        """Ask the job for a checkpoint; returns the pids signalled and a future that
        resolves when a valid checkpoint newer than this request is indexed. The notice
        file (kind, deadline) is written before the signal."""
        fut = self._new_checkpoint_future()
        if not self.child:
            return [], fut
        self.notice_id = None
        if self._notice_path is not None:
            self._notices += 1
            nid = f"{self.attempt}.{self._notices}"
            if jobnotice.write(self._notice_path, nid, kind, deadline):
                self.notice_id = nid
        signum = process.signal_number(self.spec.emergency_save.signal)
        sent = process.deliver_save_signal(self.child, signum)
        if sent:
            # Only a delivered request is timed: a refused one never produced a save, and
            # timing it raised a false "slow saves" warning minutes later.
            self._save_requested_mono = time.monotonic()
        self.event("save-requested", pids=sent)
        if not sent:
            msg = (f"no process of job {self.name} catches {self.spec.emergency_save.signal}: "
                   f"it cannot do emergency saves")
            self.log.note(msg)
            log.warning(msg)
        return sent, fut

    # -- the stop flow -------------------------------------------------------------------
    def stop(self, *, save: bool = True, final: State = S.STOPPED, grace: float | None = None,
             deadline_wall: float | None = None, then_restart: str | None = None,
             source: str = "manual") -> asyncio.Task:
        """Save (if asked), confirm, then stop. Repeated requests coalesce into the flow
        already running."""
        if self._flow is not None:
            return self._flow
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        self._flow_kind = source
        self._flow_intent = {"final": final.value, "then_restart": then_restart, "source": source}
        self._flow = self.loop.create_task(
            self._stop_flow(save, final, grace, deadline_wall, then_restart, source))
        self._flow.add_done_callback(self._flow_done)
        return self._flow

    def _flow_done(self, task: asyncio.Task) -> None:
        self._flow = None
        self._flow_kind = None
        self._flow_intent = None
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

    async def _stop_flow(self, save: bool, final: State, grace: float | None, deadline_wall: float | None,
                         then_restart: str | None, source: str) -> dict:
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
        if self.mirror is not None and save and not then_restart:
            self.mirror.emergency(notice_at)      # its save goes to the store ahead of anything
        # Without a checkpoint dir no save can be confirmed: SIGTERM ("save if you can
        # and exit") is the whole request.
        if save and spec.checkpoint is not None:
            if self.save_durations and max(self.save_durations) > grace:
                # Say so before it fails: the recent saves took longer than the time left.
                outcome["warning"] = (f"recent saves took up to {max(self.save_durations):.1f}s, "
                                      f"longer than the {grace:.1f}s left")
                self.event("save-too-slow", took_s=round(max(self.save_durations), 3), time_left_s=round(grace, 3))
            self._set(S.SAVING, source=source)
            sent, fut = self.request_save("preempt", deadline_wall if deadline_wall is not None else notice_at + grace)
            self.host.emergency_save_started(grace)
            try:
                if sent and self._exit_fut is not None:
                    waiters = [fut, asyncio.shield(self._exit_fut)]
                    done, _ = await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
                    if fut in done:
                        outcome.update(outcome="saved", step=fut.result().step,
                                       save_s=round(time.monotonic() - t0, 3))
                    elif done and self._acked("saved"):
                        # It saved for this notice and exited before the index saw the save.
                        await self.ckpts.refresh()
                        if fut.done():
                            outcome.update(outcome="saved", step=getattr(self._resume_point(), "step", None),
                                           save_s=round(time.monotonic() - t0, 3))
                        else:
                            outcome.update(outcome="exited before a new checkpoint")
                    elif done:
                        outcome.update(outcome="exited before a new checkpoint")
                    else:
                        outcome.update(outcome=f"no save within {grace:g}s")
                else:
                    outcome.update(outcome="job does not catch the save signal", lost=self._work_lost())
            finally:
                if not fut.done():
                    fut.cancel()
        self._set(S.STOPPING, source=source)
        cg = self.child.cgroup if self.child else None
        if self.alive and outcome.get("outcome") == "saved" and self._acked():
            # The job saved for this preemption and ends by itself (exit 0): no SIGTERM,
            # which would ask a helper for a second save. Its exit may take a while (a
            # framework's teardown, a loaded machine): what is left of the grace, at least
            # stop_timeout.
            left = max(spec.stop_timeout, grace - (time.monotonic() - t0))
            if await self._wait_exit(left):
                outcome["exited"] = "by itself after its save"
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
        if self.mirror is not None and save and not then_restart and outcome.get("outcome") == "saved":
            # Stopped on time; the flow ends once the save is in the store or the deadline passed.
            outcome["store"] = await self.mirror.wait_uploaded(notice_at + grace)
        # Recorded when the flow is over; when the notice came is a field of its own.
        self.event("notice", **{k: v for k, v in outcome.items() if k != "at"}, noticed_at=notice_at)
        self.last_notice = outcome
        if then_restart:
            self.restart_reason = then_restart
            self._launch()
        else:
            self._set(final)
        return outcome

    def _work_lost(self) -> str:
        """What stopping without a save throws away, for the user who asked for the stop."""
        latest = self._resume_point()
        if latest is None:
            return "no valid checkpoint: all work of this run is lost"
        age = f"{_ago(time.time() - latest.mtime)} ago, " if latest.mtime else ""
        return f"work since the last checkpoint is lost (last checkpoint {age}step {latest.step})"

    def _save_signal_warnings(self) -> list[str]:
        """Say before it matters that no process of the job catches the save signal (from
        the last off-loop sample: ProcSample)."""
        c = self.child
        if c is None or self.spec.checkpoint is None or time.monotonic() - c.started_mono < CATCH_GRACE_S:
            return []
        seen = self._catch_seen
        if seen is None or seen[0] != c.pid or seen[1]:
            return []
        return [f"no process catches {self.spec.emergency_save.signal}: emergency saves impossible "
                f"(see README 'Integrations')"]

    def _acked(self, state: str | None = None) -> bool:
        """The job acknowledged the current notice and will exit after its save."""
        nid = self.notice_id
        if nid is None or self._notice_path is None:
            return False
        ack = jobnotice.read_ack(self._notice_path, nid)
        return bool(ack and ack.get("exits") and (state is None or ack.get("state") == state))

    # -- views ---------------------------------------------------------------------------
    def proc_sample_due(self, now: float) -> bool:
        """Whether `status` needs a fresher /proc sample of this job (at most one a
        PROC_MAX_AGE per attempt; a new attempt is read at once)."""
        c = self.child
        if c is None:
            return False
        pid, at = self._proc_seen
        return pid != c.pid or now - at >= PROC_MAX_AGE

    def never_sampled(self) -> bool:
        """The running attempt has no /proc sample yet (status would show none)."""
        return self.child is not None and self._proc_seen[0] != self.child.pid

    def proc_sample_next(self) -> float:
        """When (monotonic) this job's sample ages out; +inf with nothing running."""
        return self._proc_seen[1] + PROC_MAX_AGE if self.child is not None else float("inf")

    def read_proc(self) -> ProcSample | None:
        """Off the loop (a thread): stop state, RSS, and whether any process of the job
        catches the save signal. Reads /proc and the cgroup only; changes nothing here.
        The monitor keeps RSS current itself when a memory limit is set."""
        c = self.child
        if c is None:
            return None
        rss = None
        if self.monitor is not None and not self.spec.memory.limit:
            try:
                rss = self.monitor.sample_rss(max_age=PROC_MAX_AGE)
            except Exception:
                pass
        catches = None
        seen = self._catch_seen
        now = time.monotonic()
        if (self.spec.checkpoint is not None and now - c.started_mono >= CATCH_GRACE_S
                and (seen is None or seen[0] != c.pid or now - self._catch_at > (5.0 if seen[1] else PROC_MAX_AGE))):
            signum = process.signal_number(self.spec.emergency_save.signal)
            try:
                pids = [c.pid] + process.descendants(c.pid)
            except OSError:
                pids = [c.pid]
            catches = any(process.catches_signal(p, signum) for p in pids)
        return ProcSample(c.pid, is_stopped(c.pid), rss, catches)

    def apply_proc(self, sample: ProcSample, at: float) -> None:
        """On the loop: take a sample read off it, if it is still of the current attempt."""
        c = self.child
        if c is None or c.pid != sample.pid:
            return
        self._proc_seen = (sample.pid, at)
        self.sigstopped = sample.stopped
        if sample.rss is not None:
            self.memory_rss = sample.rss
        if sample.catches is not None:
            self._catch_seen = (sample.pid, sample.catches)
            self._catch_at = at

    def _checkpoint_summary(self) -> tuple:
        """(latest valid, valid count, invalid count, bytes), recounted only when the index
        is replaced (the checkpoint service assigns a new list on each refresh)."""
        infos = self.checkpoints
        seen, summary = self._ck_summary
        if seen is not infos or not summary:
            summary = (self._resume_point(), sum(1 for i in infos if i.valid),
                       sum(1 for i in infos if not i.valid and not i.in_progress), sum(i.bytes for i in infos))
            self._ck_summary = (infos, summary)
        return summary

    def status_row(self) -> tuple[bytes, bytes]:
        """What the `status` table shows of this job (render.TABLE_FIELDS: one string,
        JSON-encoded) and its notes (error, warnings, the last notice: a JSON object, or
        b"" when none), re-encoded only when any of it changed. Times travel as wall
        timestamps (`started`, checkpoint `mtime`): the reader computes ages, so a row
        does not go stale as time passes."""
        c = self.child
        ck = self.ckpts
        # Time alone changes two things shown (a notice ages out, the save-signal check's
        # grace ends): the row is also re-made once a PROC_MAX_AGE.
        key = (self.row_gen, ck.row_gen, self.tracker.row_gen, int(time.monotonic() / PROC_MAX_AGE),
               self.mirror.row_gen if self.mirror is not None else 0)
        if key == self._row[0]:
            return self._row[1]
        latest, invalid, nbytes = None, None, None
        if self.spec.checkpoint:
            latest, _, invalid, nbytes = self._checkpoint_summary()
        row = table_row(
            name=self.name, state="stopped" if self.sigstopped and c else self.state.value,
            pid=c.pid if c else None, started=int(c.started_wall) if c else None, restarts=self.restarts,
            crashes_in_a_row=self.tracker.consecutive, has_checkpoint=bool(self.spec.checkpoint),
            step=latest.step if latest else None, latest=str(latest.path) if latest else None,
            mtime=int(latest.mtime) if latest and latest.mtime else None, invalid=invalid, bytes=nbytes,
            quota=self.spec.checkpoint.quota if self.spec.checkpoint else None, over_quota=ck.over_quota,
            rss=self.memory_rss, mem_limit=self.spec.memory.limit,
            adopted=int(self.supervised_since or 0) if c is not None and c.adopted else None,
            goodput=self._goodput_percent())
        ln = self.last_notice
        shown = ln if ln and time.time() - float(ln.get("at") or 0) < NOTICE_SHOWN_FOR else None
        warnings = list(ck.warnings) + self._save_signal_warnings()
        if self.mirror is not None:
            warnings += self.mirror.warnings()
        notes = {k: v for k, v in (("error", self.error), ("warnings", warnings), ("last_notice", shown),
                                   ("config_error", self.config_error)) if v}
        encoded = (json.dumps(row).encode(), json.dumps(notes, separators=(",", ":")).encode() if notes else b"")
        self._row = (key, encoded)
        return encoded

    def _goodput_percent(self) -> str | None:
        """GOODPUT in the table: a percent, one decimal (re-made with the row each second)."""
        ratio = self.goodput.at(time.time(), self.state.value).ratio
        return None if ratio is None else f"{ratio * 100:.1f}"

    def status(self) -> dict:
        latest, valid, invalid, total = self._checkpoint_summary()
        c = self.child
        now = time.time()
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
            "crashes_in_a_row": self.tracker.consecutive,
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
            # A notice's outcome is news for a while, then history (`trainsup history`).
            "last_notice": self.last_notice if self.last_notice and
            now - float(self.last_notice.get("at") or 0) < NOTICE_SHOWN_FOR else None,
            "warnings": list(self.ckpts.warnings) + self._save_signal_warnings()
            + (self.mirror.warnings() if self.mirror is not None else []),
            "mirror": self.mirror.status() if self.mirror is not None else None,
            "error": self.error,
            "config_error": self.config_error,
            "source": str(self.spec.source),
            "user": self.spec.user,
            "containment": c.containment if c is not None else
            (self.host.containment.kind if self.host.containment is not None else cgroup.PROCESS_GROUP),
            # since when this daemon supervises the running attempt, and whether it took
            # it over from an earlier daemon (a crash or re-exec) rather than launching it
            "supervised_since": self.supervised_since if c is not None else None,
            "adopted": bool(c is not None and c.adopted),
            # productive training over wall time since the first launch, and the rest by part
            "goodput": self.goodput.at(now, self.state.value).as_dict(),
        }
