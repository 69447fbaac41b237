"""At daemon start: take over the jobs an earlier daemon on this state dir left behind.

A daemon that crashed, was killed or re-executed itself leaves its jobs running, each
under its shim (launch/shim.py), which keeps writing the job's log and, when the job
ends, its exit status. The next daemon, holding the state-dir lock (so no other daemon can
be doing the same) and before it launches anything:

- finds every launch of this state dir: its cgroups `<tree>/<job>.<attempt>` (the tree is
  named after this state dir, so another daemon's jobs are never looked at), or, without
  cgroups, the shims that name this tree on their command line; and the exit statuses the
  shims left in `<state>/exits/`;
- takes over each job still running (Job.adopt): the shim verified (its command line
  names this launch, it runs as the daemon's user, it is the root of its cgroup) and held
  by a pidfd, the job by another: the same attempt, no save asked, no relaunch;
- handles each exit that happened while no daemon ran as if it had been seen
  (Job.exited_unseen), recorded once, with the code or signal and the time the shim
  wrote;
- ends what no valid job claims any more (its file was removed or broke meanwhile) and
  what a job's ended attempt left in its cgroup.

The decisions are from what the processes and files say, checked against the state
database: the database may be a little behind (its last writes died with the daemon)
or brand new (a corrupt one was moved aside); the cgroups and status files are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .job import Job, State
from .launch import cgroup, process, shim

if TYPE_CHECKING:
    from .loop import Daemon

log = logging.getLogger("trainsup.adoption")

# Persisted states in which the daemon had not yet decided what an attempt's end means.
# (STARTING is one only for an attempt whose shim left a status: see _settle.)
_UNDECIDED = {State.RUNNING.value, State.SAVING.value, State.STOPPING.value}
END_TIMEOUT = 10.0        # a job no file claims any more: SIGTERM, then this long, then SIGKILL


@dataclass
class Launch:
    """One launch of one job, as found on the machine."""
    name: str                               # <job>.<attempt>
    job: str
    attempt: int
    cgroup: cgroup.JobCgroup | None = None
    populated: bool = False
    shim_pid: int | None = None             # a live shim, recognised by its command line
    status: shim.ExitStatus | None = None   # what the shim wrote when the job ended


def _split(name: str) -> tuple[str, int] | None:
    job, _, attempt = name.rpartition(".")
    return (job, int(attempt)) if job and attempt.isdigit() else None


def survey(containment: cgroup.Containment, state_dir: Path) -> list[Launch]:
    """Every launch of this state dir with something left of it (a process, a status).
    Reads /proc, cgroup files and the exits dir only: run off the loop."""
    tree = cgroup.tree_name(state_dir)
    found: dict[str, Launch] = {}
    if containment.root is not None:
        for cg in containment.job_cgroups():
            parts = _split(cg.name)
            if parts is None:
                continue
            pids = cg.pids()
            found[cg.name] = Launch(cg.name, *parts, cg, bool(pids),
                                    shim.shim_in(pids, shim.tree_marker(tree, cg.name)) if pids else None)
    else:
        for name, pid in shim.scan_shims(tree).items():
            parts = _split(name)
            if parts is not None:
                found[name] = Launch(name, *parts, None, True, pid)
    try:
        # not a job path: the daemon's shim exit dir (state dir)
        entries = os.listdir(shim.exits_dir(state_dir))
    except OSError:
        entries = []
    for name in entries:
        parts = _split(name)
        if parts is None:
            continue
        st = shim.read_status(shim.status_path(state_dir, name))
        if st is not None:
            found.setdefault(name, Launch(name, *parts)).status = st
    return sorted(found.values(), key=lambda launch: (launch.job, launch.attempt))


async def take_over(d: Daemon, via: str) -> set[str]:
    """Adopt, settle and clean up (see the module doc). Returns the jobs taken care of
    here: the daemon's autostart leaves those alone."""
    containment = d.containment
    assert containment is not None
    state_dir = d.spec.state_dir
    shim.exits_dir(state_dir).mkdir(parents=True, exist_ok=True)
    launches = await d.loop.run_in_executor(None, survey, containment, state_dir)
    by_job: dict[str, list[Launch]] = defaultdict(list)
    for launch in launches:
        by_job[launch.job].append(launch)
    taken: set[str] = set()
    stale: list[str] = []
    ends = []
    tree = cgroup.tree_name(state_dir)
    for name in sorted(set(by_job) | set(d.jobs)):
        mine = by_job.get(name, [])
        job = d.jobs.get(name)
        if job is None:
            for launch in mine:
                if launch.populated:
                    ends.append(_end(d, launch, "no valid job file claims it any more"))
                else:
                    shim.discard_status(shim.status_path(state_dir, launch.name))
            continue
        if _settle(d, job, mine, tree, via):
            taken.add(name)
        stale.extend(launch.name for launch in mine if launch.status is not None and launch.attempt < job.attempt)
        for launch in mine:
            if not launch.populated or (job.child is not None and launch.attempt == job.attempt):
                continue
            if launch.status is not None and launch.cgroup is not None:
                # What an ended attempt left behind: nothing of an attempt outlives it.
                launch.cgroup.kill()
            else:
                # Not taken over (no shim, or one that failed verification): it must not
                # run beside the attempt this daemon will launch.
                ends.append(_end(d, launch, "it could not be taken over (no verified shim)"))
    # What was recorded here is committed before the status files it came from go.
    d.flush()
    for name in stale:
        shim.discard_status(shim.status_path(state_dir, name))
    if ends:
        await asyncio.gather(*ends, return_exceptions=True)
    containment.remove_empty()
    return taken


def _settle(d: Daemon, job: Job, mine: list[Launch], tree: str, via: str) -> bool:
    """Take this job's latest attempt over, or settle how it ended. True when the job
    is taken care of (running again under this daemon, or its end being handled)."""
    data = job.persisted
    recorded = (job.last_exit or {}).get("attempt")
    live = [launch for launch in mine if launch.shim_pid is not None]
    current = max(live, key=lambda launch: launch.attempt) if live else None
    ended = [launch for launch in mine if launch.status is not None and launch.attempt >= job.attempt
             and (current is None or launch.attempt < current.attempt)]
    latest = max([launch.attempt for launch in live + ended], default=0)
    # Exits before the latest attempt that the dead daemon never recorded (it died between
    # a relaunch and its commit): into the history; there is nothing left to decide.
    for launch in ended:
        if launch.attempt < latest and recorded != launch.attempt:
            st = launch.status
            assert st is not None
            ex = process.classify_exit(st.returncode)
            job.event("exit", attempt=launch.attempt, pid=st.pid, reason=ex.reason, code=ex.code,
                      signal=ex.signal, exited_at=st.at, while_no_daemon=True)
    if current is not None:
        child = _verified(current, tree, d.spec.state_dir, data.get("pid"))
        if child is not None:
            job.adopt(child, current.attempt, via)
            return True
        st = shim.read_status(shim.status_path(d.spec.state_dir, current.name))
        if st is not None:
            # The job and its shim ended between the survey and the check: the status it
            # just wrote tells how (ending the launch would have thrown that exit away).
            current.status, current.shim_pid = st, None
            return _settle(d, job, mine, tree, via)
        log.warning("job %s: launch %s could not be verified; it is ended, not taken over", job.name, current.name)
        return False
    last = max(ended, key=lambda launch: launch.attempt) if ended else None
    if last is None:
        if data.get("shim") and data.get("state") in _UNDECIDED:
            # Under a shim, yet neither its process nor its exit status is left.
            job.event("lost", attempt=job.attempt, pid=data.get("pid"),
                      why="its process is gone and left no exit status (a reboot, or its shim was killed)")
        return False
    assert last.status is not None
    # STARTING at this very attempt: the dead daemon launched it (its shim left this status)
    # and died before the launch was followed by anything; nobody decided what its end means.
    undecided = last.attempt > job.attempt or data.get("state") in _UNDECIDED \
        or (data.get("state") == State.STARTING.value and last.attempt == job.attempt) \
        or (data.get("state") == State.STOPPED.value and data.get("sigstopped") and data.get("pid"))
    if not undecided:
        return False           # the dead daemon saw this exit and decided; the file told its all
    started = data.get("started") if last.attempt == job.attempt else None
    leader = shim.ShimLeader(last.status.pid, shim.status_path(d.spec.state_dir, last.name), ours=False)
    leader.reaped = True
    child = process.Child(leader, -1, 0.0, float(started or last.status.at), 0.0, cgroup=last.cgroup,
                          job_pid=last.status.pid, adopted=True)
    job.exited_unseen(child, last.status, last.attempt, via, recorded=recorded == last.attempt)
    return True


def _verified(launch: Launch, tree: str, state_dir: Path, hint: int | None) -> process.Child | None:
    """The Child of a live launch, its shim and job each held by a pidfd that was checked
    after opening to be the process it should be; None when that does not hold."""
    assert launch.shim_pid is not None
    marker = shim.tree_marker(tree, launch.name)
    cg = launch.cgroup

    def is_our_shim(pid: int) -> bool:
        return shim.is_shim(pid, marker) and (cg is None or pid in cg.pids())
    shim_fd = shim.open_verified(launch.shim_pid, is_our_shim)
    if shim_fd is None:
        return None
    shim_pid = launch.shim_pid
    job_pid = shim.job_of(shim_pid, hint if isinstance(hint, int) else None)
    job_fd = -1
    if job_pid is not None:
        fd = shim.open_verified(job_pid, lambda p: shim.parent_of(p) == shim_pid)
        job_fd = -1 if fd is None else fd
    ours = shim.parent_of(shim_pid) == os.getpid()       # a re-exec keeps its children
    return process.adopt(shim_pid, shim_fd, job_pid if job_pid is not None else shim_pid, job_fd,
                         shim.status_path(state_dir, launch.name), cg, ours)


async def _end(d: Daemon, launch: Launch, why: str) -> None:
    """End a launch nobody will supervise: SIGTERM to every process of it, SIGKILL to
    what is left after END_TIMEOUT (its cgroup, else the shim's tree)."""
    log.warning("launch %s: %s; stopping it", launch.name, why)
    d.record_event(launch.job, "orphan-stopped", {"launch": launch.name, "why": why})
    try:
        await _end_processes(d, launch)
    finally:
        # Its end was this daemon's doing, not something to handle at the next start.
        shim.discard_status(shim.status_path(d.spec.state_dir, launch.name))


async def _end_processes(d: Daemon, launch: Launch) -> None:
    cg = launch.cgroup
    if cg is not None:
        cg.signal_all(signal.SIGTERM)
        if not await cg.wait_empty(END_TIMEOUT):
            cg.kill()
            await cg.wait_empty(5.0)
        cg.remove()
        return
    if launch.shim_pid is None:
        return
    fd = shim.open_verified(launch.shim_pid, lambda p: shim.is_shim(p, shim.tree_marker(
        cgroup.tree_name(d.spec.state_dir), launch.name)))
    if fd is None:
        return
    shim_pid = launch.shim_pid

    def send(sig: int) -> None:
        # TERM to the job's tree; KILL to whatever of it is left and to the shim too
        for pid in [*process.descendants(shim_pid), *([shim_pid] if sig == signal.SIGKILL else [])]:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    try:
        await process.term_then_kill(d.loop, fd, send, END_TIMEOUT)
    finally:
        os.close(fd)
