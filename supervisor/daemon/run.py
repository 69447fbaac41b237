"""`trainsup run JOB.yaml`: one job supervised in the foreground by the daemon's own code.

This is what a container's main process or a Slurm batch step runs. RunDaemon is the
Daemon (same launch, save signal, confirmation, restart with backoff, checkpoint index,
rotation, quota, history and control socket) with a one-file jobs source, and it exits
when its job reaches a final state. The exit code says how the job ended:

  0  finished   the job exited 0 and its restart policy let it end
  1  failed     restarts exhausted, or the job could not be started
  2  usage      bad command line, invalid job file, state dir in use
  3  preempted  stopped by a notice (SIGTERM, `trainsup preempt`, a Slurm time limit)
                after its emergency save: run it again and it resumes
  4  stopped    stopped on request (`trainsup stop`)

SIGTERM (and SIGINT) is a preemption notice: save, confirm, stop, exit 3. Inside a Slurm
allocation the notices differ (see slurm.py): USR1 to the batch step is the time-limit
warning (save, requeue, exit 3); a preemption is found from scontrol when the step ends
or TERM comes (save confirmed, then requeue ourselves, else stay alive until Slurm ends
the job: one that exits during GraceTime is not requeued).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config, contract
from ..spec import DaemonSpec, InvalidJob, JobSpec
from .job import Job, State
from .loop import Daemon

if TYPE_CHECKING:
    from ..slurm.allocation import Allocation

log = logging.getLogger("trainsup.run")

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED, EXIT_STOPPED = 0, 1, 2, 3, 4
FINAL_CODES = {State.FINISHED: EXIT_FINISHED, State.FAILED: EXIT_FAILED,
               State.PREEMPTED: EXIT_PREEMPTED, State.STOPPED: EXIT_STOPPED}


class RunDaemon(Daemon):
    """The daemon, for one job file, ending with its job."""

    def __init__(self, spec: DaemonSpec, job_file: Path, slurm: Allocation | None = None):
        super().__init__(spec)
        self.job_file = job_file
        self.slurm = slurm
        self._ending: asyncio.Task | None = None    # a notice's flow that ends the run
        self._exiting = False
        self._released: asyncio.Event | None = None  # a second TERM ends a Slurm stay
        self._echo: asyncio.Queue | None = None

    # -- the jobs source: one file ---------------------------------------------------------
    def _read_jobs(self) -> config.JobsDirScan:
        scan = config.scan_job_file(self.job_file, is_root=self.is_root, state_dir=self.spec.state_dir)
        if self.slurm is not None:
            scan.jobs = [self.slurm.wrap(j) for j in scan.jobs]
        return scan

    def _add_job(self, spec: JobSpec) -> Job:
        job = super()._add_job(spec)
        if self._echo is None:
            # The job's output also goes to our stdout (a container's or a batch step's
            # log); a reload that replaces the job moves this follower along.
            self._echo = asyncio.Queue(maxsize=10000)
            job.log.followers.add(self._echo)
            self._spawn_task(self._echo_output(self._echo), "echoing the job's output")
        return job

    async def _echo_output(self, q: asyncio.Queue) -> None:
        out = sys.stdout.buffer
        while True:
            data = await q.get()
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError):
                return          # stdout closed: the log file still has everything

    def _autostart(self, job: Job) -> None:
        # `trainsup run` means "run it": a job that finished, failed or was stopped last
        # time starts again with a fresh crash budget; a preempted one resumes.
        if job.persisted_state in (State.FAILED.value, State.FINISHED.value, State.STOPPED.value):
            job.forget_crashes()
        job.start(reason=job.restart_reason)

    def _start_notice_sources(self) -> None:
        super()._start_notice_sources()
        # The loop's handlers are in: act on notices that came while we were starting.
        from .. import earlysignals
        for signum in earlysignals.take():
            log.warning("acting on %s received during startup", signal.Signals(signum).name)
            (self._on_usr1 if signum == signal.SIGUSR1 else self._on_term)()

    @property
    def job(self) -> Job | None:
        return next(iter(self.jobs.values()), None)

    # -- ending ----------------------------------------------------------------------------
    def state_changed(self, job: Job) -> None:
        super().state_changed(job)
        code = FINAL_CODES.get(job.state)
        if code is not None and self._ending is None and not job.retired:
            self._finish(code)

    def _finish(self, code: int) -> None:
        if self._exiting:
            return
        self._exiting = True
        self._exit_code = code
        job = self.job
        log.info("job %s ended %s: exit code %d", job.name if job else "-",
                 job.state.value if job else "-", code)
        if self._stop is not None:
            self.loop.call_soon(self._stop.set)

    def _notice(self, flow: Callable[[], Coroutine], what: str) -> None:
        if self._ending is not None or self._exiting:
            return          # one notice at a time; the first one decides
        self._ending = self._spawn_task(flow(), what)

    # -- signals -----------------------------------------------------------------------------
    def _on_term(self) -> None:
        if self._released is not None:
            self._released.set()     # a second TERM while staying alive for Slurm
            return
        if self.job is None:
            self._finish(EXIT_USAGE)
            return
        self._notice(self._preempted, "preemption notice (SIGTERM)")

    def _on_usr1(self) -> None:
        if self.slurm is None:
            super()._on_usr1()       # a checkpoint now, as the daemon does
            return
        self._notice(self._time_limit, "Slurm time-limit warning (USR1)")

    async def _stop_job(self, source: str) -> dict | None:
        job = self.job
        if job is None:
            return None
        self.record_event(job.name, "notice", {"source": source})
        try:
            return await job.stop(save=True, final=State.PREEMPTED, source=source)
        except Exception as e:
            log.error("job %s: stop flow failed: %r", job.name, e)
            return None

    async def _preempted(self) -> None:
        job = self.job
        if self.slurm is None:
            await self._stop_job("sigterm")
            self._finish(FINAL_CODES.get(job.state, EXIT_PREEMPTED) if job else EXIT_PREEMPTED)
            return
        await self._stop_job("slurm-term")
        try:
            why = await self.loop.run_in_executor(None, self.slurm.ended_by_slurm)
        except Exception as e:
            log.warning("could not ask Slurm why it sent TERM: %s", e)
            why = None
        if job is not None and job.state == State.PREEMPTED:
            await self._after_slurm_notice(job, why)
        else:
            self._finish(FINAL_CODES.get(job.state, EXIT_FAILED) if job else EXIT_FAILED)

    async def claims_exit(self, job: Job) -> bool:
        """Under Slurm a preemption signals the tasks, not always the batch step: the ranks
        save and exit 0, and only Slurm knows the step ended because of a preemption (or a
        cancel or the time limit). Then the job is preempted, not finished or crashed."""
        if self.slurm is None or self._ending is not None or self._exiting:
            return False
        try:
            why = await self.loop.run_in_executor(None, self.slurm.ended_by_slurm)
        except Exception as e:
            log.warning("job %s: could not ask Slurm why the step ended: %s", job.name, e)
            return False
        if not why:
            return False
        self._notice(lambda: self._step_ended_by_slurm(job, why), f"Slurm {why}")
        return True

    async def _step_ended_by_slurm(self, job: Job, why: str) -> None:
        await job.stop(save=False, final=State.PREEMPTED, source=f"slurm-{why}")
        latest = job.ckpts.latest_valid()
        notice = {"source": f"slurm-{why}", "at": time.time(),
                  "outcome": "saved by the ranks" if latest else "no checkpoint",
                  "step": getattr(latest, "step", None)}
        job.note_notice(notice)
        job.event("notice", **{k: v for k, v in notice.items() if k != "at"})
        await self._after_slurm_notice(job, why)

    async def _after_slurm_notice(self, job: Job, why: str | None) -> None:
        """The save is confirmed (or the ranks are gone). A preempted job is requeued now,
        by us, with StartTime=now: what Slurm does when GraceTime ends, without idling out
        the grace and then ~121 s in BeginTime. If that fails, or this was a cancel or the
        time limit, stay alive until Slurm ends the job (a preempted job that exits during
        GraceTime is not requeued by Slurm)."""
        assert self.slurm is not None
        if why is None or (why == "preempt" and await self._requeue(job)):
            self._finish(EXIT_PREEMPTED)     # (None: a TERM that was not Slurm's: just exit)
            return
        log.info("staying alive until Slurm requeues or ends this job")
        self._released = asyncio.Event()
        await self._released.wait()      # a second TERM releases; usually Slurm's KILL comes first
        self._finish(EXIT_PREEMPTED)

    async def _requeue(self, job: Job) -> bool:
        assert self.slurm is not None
        # Recorded, durably, before it is asked for: the requeue ends this batch step, and
        # Slurm may kill us (KillWait) before the next turn of the loop would commit it.
        self.record_event(job.name, "slurm-requeue", {"job_id": self.slurm.job_id})
        self.flush()
        try:
            took = await self.loop.run_in_executor(None, self.slurm.requeue_now)
        except Exception as e:      # SlurmError, or scontrol missing: say so
            log.error("job %s: requeue failed: %s", job.name, e)
            self.record_event(job.name, "slurm-requeue-failed", {"error": str(e)})
            self.flush()
            return False
        log.info("job %s: requeued in %.3fs", job.name, took)
        return True

    async def _time_limit(self) -> None:
        assert self.slurm is not None
        job = self.job
        await self._stop_job("slurm-time-limit")
        if job is None or job.state != State.PREEMPTED:
            self._finish(FINAL_CODES.get(job.state, EXIT_FAILED) if job else EXIT_FAILED)
            return
        await self._requeue(job)
        self._finish(EXIT_PREEMPTED)


# -- the command --------------------------------------------------------------------------

def run_job(job_file: Path, *, state_dir: Path | None = None, socket: Path | None = None,
            slurm: str = "auto") -> int:
    """`trainsup run`: returns the exit code (see the module doc)."""
    from ..control.server import SocketRefused
    from .notices.trigger import TriggerRefused
    from .state import LockHeld, StateUnusable
    is_root = os.geteuid() == 0
    job = config.load_job_file(job_file, is_root=is_root)
    if isinstance(job, InvalidJob):
        for line in job.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    state = Path(os.path.abspath(state_dir)) if state_dir else config.default_state_dir(job)
    sock = Path(os.path.abspath(socket)) if socket else config.default_socket(state)
    if len(os.fsencode(str(sock))) > config.UNIX_SOCKET_PATH_MAX:
        print(f"trainsup: socket path {sock} is too long; pass --socket", file=sys.stderr)
        return EXIT_USAGE
    allocation = None
    if slurm == "on" or (slurm == "auto" and os.environ.get("SLURM_JOB_ID")):
        from ..slurm.allocation import Allocation, SlurmError
        try:
            allocation = Allocation.from_env(job)
        except SlurmError as e:
            print(f"trainsup: {e}", file=sys.stderr)
            return EXIT_USAGE
    # Everything the job would have seen when run by hand reaches it (a container's or a
    # batch step's environment: SLURM_*, CUDA_*, ...), plus the socket for `trainsup status`.
    os.environ[contract.SOCKET] = str(sock)
    spec = DaemonSpec(jobs_dir=job.source.parent, state_dir=state, socket=sock, log_dir=state / "logs",
                      pass_env=tuple(os.environ))
    print(f"trainsup run: job {job.name}, state {state}, socket {sock}", file=sys.stderr, flush=True)
    try:
        return RunDaemon(spec, job.source, allocation).run()
    except (LockHeld, SocketRefused, StateUnusable, TriggerRefused) as e:
        print(f"trainsup: {e}", file=sys.stderr)
        return EXIT_USAGE
