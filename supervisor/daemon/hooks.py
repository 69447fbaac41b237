"""Alert hooks: commands run on `failed`, `preempted`, `finished`, `saved`, `crash` and
`over-quota`.

A hook is an argv (no shell), gets the event as one JSON object on stdin, and a clean
environment like a job's (PATH, LANG, LC_*, TZ, HOME/USER/LOGNAME/SHELL, `pass_env`) plus
TRAINSUP_EVENT and TRAINSUP_JOB — never the daemon's own (NOTIFY_SOCKET, WATCHDOG_*). A
job's own `hooks:` run as that job's `user:`, with the job's environment (its `env:`).

Each run is born in a cgroup of its own (`<tree>/.hook.N`: a job name never starts with a
dot) where one is available: when its command exits, or at its timeout, or when the daemon
stops, the cgroup is killed — a `setsid` grandchild included. Without cgroups its process
group is killed and the daemon's reparented orphans that carry the run's TRAINSUP_HOOK id
are swept. Output goes to the daemon log.

Everything happens on the event loop without waiting: the process is spawned, its pidfd
and stdout are watched by the loop, and a timer kills it. The daemon reaps only by pid
(process.reap_orphans skips `pids()`), so a hook's exit status is never stolen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import DaemonSpec, HookSpec, JobSpec
from .launch import clone3, process
from .launch.cgroup import CgroupError, Containment, JobCgroup
from .pipes import read_ready

log = logging.getLogger("trainsup.hooks")

# Spawning costs a fork; it waits this long so a crash's relaunch (scheduled by the same
# exit) is never queued behind it. Alerts are for people: 50 ms is nothing to them.
SPAWN_DELAY = 0.05
MAX_RUNNING = 32              # a crash loop of 200 jobs must not fork-bomb the host
MAX_OUTPUT = 64 << 10         # per run, logged; the rest is read and dropped
MAX_STDIN = 60 << 10          # below a pipe's buffer: one non-blocking write
HOOK_CGROUP = ".hook"         # launch cgroups are `<job>.<attempt>`; a job name never starts with "."


def hook_event(kind: str, data: Mapping[str, Any], state_before: str | None) -> str | None:
    """The hook event (if any) for a recorded daemon event. `state_before` is the job's
    state when it was recorded: an exit while `running` is a crash; an exit during a
    save or stop flow is the daemon's own doing."""
    if kind == "state":
        return data.get("to") if data.get("to") in ("failed", "preempted", "finished") else None
    if kind == "exit":
        return "crash" if state_before == "running" and data.get("reason") != "exit 0" else None
    if kind == "spawn-failed":
        return "crash"
    if kind == "checkpoint" and data.get("took_s") is not None:
        return "saved"             # a save the daemon asked for, now valid
    if kind == "over-quota":
        return "over-quota"
    return None


def hook_env(event: str, job: str, job_spec: JobSpec | None, daemon_spec: DaemonSpec | None,
             own: bool, run_id: str, daemon_env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A job-like clean environment: the job's own (its user, its `env:`) for the job's
    hooks; the daemon account's for the daemon's hooks (a job's `env:` is the job
    owner's to set, not something to hand to root's alert command)."""
    settings = daemon_spec or DaemonSpec(jobs_dir=Path("/"), state_dir=Path("/"), socket=Path("/"), log_dir=Path("/"))
    spec = job_spec if own and job_spec is not None else \
        JobSpec(name=job if job != "-" else "daemon", command=("hook",), workdir=Path("/"), source=Path("/"))
    return process.build_env(spec, settings, {"TRAINSUP_EVENT": event, "TRAINSUP_JOB": job,
                                              "TRAINSUP_HOOK": run_id}, daemon_env)


def _identity(job_spec: JobSpec | None, own: bool) -> tuple[int | None, int | None, tuple[int, ...]]:
    """(uid, gid, groups) a job's own hook runs as: the job's `user:`/`group:`."""
    if not own or job_spec is None or not (job_spec.user or job_spec.group):
        return None, None, ()
    if job_spec.user and job_spec.uid is not None:
        gid = job_spec.gid if job_spec.gid is not None else os.getgid()
        return job_spec.uid, gid, tuple(job_spec.groups)
    if job_spec.gid is not None:
        return os.getuid(), job_spec.gid, (job_spec.gid,)
    return None, None, ()


@dataclass
class _Run:
    hook: HookSpec
    label: str
    leader: Any                          # subprocess.Popen | clone3.Leader
    pidfd: int
    out_fd: int
    run_id: str
    cgroup: JobCgroup | None = None
    started: float = field(default_factory=time.monotonic)
    output: bytearray = field(default_factory=bytearray)
    dropped: int = 0
    timer: asyncio.TimerHandle | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        return int(self.leader.pid)


class HookRunner:
    def __init__(self, loop: asyncio.AbstractEventLoop, daemon_hooks: Sequence[HookSpec] = (), *,
                 daemon_spec: DaemonSpec | None = None, containment: Containment | None = None):
        self.loop = loop
        self.daemon_hooks = tuple(daemon_hooks)
        self.daemon_spec = daemon_spec
        self.containment = containment
        self.running: dict[int, _Run] = {}
        self._states: dict[str, str] = {}
        self._seq = 0
        self.host = socket.gethostname()
        self.on_finished: Callable[[str, int | None, bool], None] | None = None   # tests, bench

    def pids(self) -> set[int]:
        return set(self.running)

    def on_event(self, job: str, kind: str, data: Mapping[str, Any],
                 job_hooks: Sequence[HookSpec] = (), job_spec: JobSpec | None = None) -> None:
        before = self._states.get(job)
        if kind == "state" and data.get("to"):
            self._states[job] = str(data["to"])
        event = hook_event(kind, data, before)
        if event is None:
            return
        own = job_spec.hooks if job_spec is not None else tuple(job_hooks)
        hooks = [(h, False) for h in self.daemon_hooks if event in h.on] + [(h, True) for h in own if event in h.on]
        if not hooks:
            return
        payload = {"event": event, "job": job, "at": time.time(),
                   "at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "host": self.host, "kind": kind, "data": dict(data)}
        body = json.dumps(payload, default=str).encode()[:MAX_STDIN]
        self.loop.call_later(SPAWN_DELAY, self._spawn_all, hooks, body, event, job, job_spec)

    def _spawn_all(self, hooks: Sequence[tuple[HookSpec, bool]], body: bytes, event: str, job: str,
                   job_spec: JobSpec | None) -> None:
        for hook, own in hooks:
            self._spawn(hook, body, event, job, job_spec, own)

    def _spawn(self, hook: HookSpec, body: bytes, event: str, job: str, job_spec: JobSpec | None,
               own: bool) -> None:
        name = os.path.basename(hook.command[0])
        label = f"{event} {job}"
        if len(self.running) >= MAX_RUNNING:
            log.warning("hook %s for %s not run: %d hooks still running", name, label, len(self.running))
            return
        self._seq += 1
        run_id = f"{os.getpid()}.{self._seq}"
        env = hook_env(event, job, job_spec, self.daemon_spec, own, run_id)
        uid, gid, groups = _identity(job_spec, own)
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        cg: JobCgroup | None = None
        try:
            if self.containment is not None:
                try:
                    cg = self.containment.create(HOOK_CGROUP, self._seq)
                except CgroupError as e:
                    log.warning("hook %s for %s: no cgroup (%s); its process group only", name, label, e)
            leader, pidfd = self._launch(hook.command, env, in_r, out_w, cg, uid, gid, groups)
        except OSError as e:
            log.error("hook %s for %s: cannot run %s: %s", name, label, hook.command[0], e.strerror or e)
            for fd in (in_w, out_r):
                os.close(fd)
            if cg is not None:
                cg.remove()
            return
        finally:
            os.close(in_r)
            os.close(out_w)
        run = _Run(hook, label, leader, pidfd, out_r, run_id, cg)
        self.running[run.pid] = run
        try:
            os.set_blocking(in_w, False)
            os.write(in_w, body)
        except (BlockingIOError, BrokenPipeError):
            pass                     # the hook did not read its stdin: its business
        finally:
            os.close(in_w)
        os.set_blocking(run.out_fd, False)
        self.loop.add_reader(run.out_fd, self._read, run)
        self.loop.add_reader(pidfd, self._exited, run)
        run.timer = self.loop.call_later(hook.timeout, self._timeout, run)

    def _launch(self, argv: Sequence[str], env: Mapping[str, str], stdin_fd: int, stdout_fd: int,
                cg: JobCgroup | None, uid: int | None, gid: int | None, groups: Sequence[int]) -> tuple[Any, int]:
        """Start the hook in its own session, born in `cg` (clone3 where it can; else a Popen
        from inside it), as uid/gid when given. Returns (leader, pidfd)."""
        if cg is not None and cg.version == 2 and clone3.available():
            # not a job path: cgroupfs
            cg_fd = os.open(cg.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return clone3.spawn(list(argv), env, "/", stdout_fd, cg_fd, uid=uid, gid=gid, groups=groups,
                                    stdin_fd=stdin_fd)
            finally:
                os.close(cg_fd)
        drop: dict[str, Any] = {}
        if gid is not None:
            drop = {"group": gid, "extra_groups": list(groups)}
            if uid is not None:
                drop["user"] = uid
        entered = self.containment.entered(cg) if self.containment is not None else contextlib.nullcontext()
        try:
            with entered:
                p = subprocess.Popen(list(argv), stdin=stdin_fd, stdout=stdout_fd, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd="/", env=dict(env), close_fds=True, **drop)
        except (CgroupError, subprocess.SubprocessError) as e:
            raise OSError(0, str(e)) from None
        try:
            return p, os.pidfd_open(p.pid)
        except OSError:             # cannot watch it: kill rather than leak a process
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise

    def _read(self, run: _Run) -> None:
        chunk = read_ready(run.out_fd)
        if chunk is None:
            return
        if not chunk:
            self.loop.remove_reader(run.out_fd)
            return
        room = MAX_OUTPUT - len(run.output)
        run.output += chunk[:max(0, room)]
        run.dropped += max(0, len(chunk) - max(0, room))

    def _timeout(self, run: _Run) -> None:
        run.killed = True
        log.warning("hook %s for %s: no exit within %gs; killing it", os.path.basename(run.hook.command[0]),
                    run.label, run.hook.timeout)
        self._kill(run)

    def _kill(self, run: _Run) -> None:
        """Everything of the run: its cgroup (a setsid grandchild included), else its
        process group and the orphans it left to the daemon (found by TRAINSUP_HOOK)."""
        if run.cgroup is not None:
            try:
                run.cgroup.kill()
            except CgroupError as e:
                log.warning("hook for %s: %s", run.label, e)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)   # not reaped yet: the pid is still ours
        marker = b"TRAINSUP_HOOK=" + run.run_id.encode()
        for pid in process.descendants(run.pid) + _own_children():
            if pid == run.pid:
                continue
            try:
                # not a job path: /proc
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _exited(self, run: _Run) -> None:
        self.loop.remove_reader(run.pidfd)
        os.close(run.pidfd)
        if run.timer is not None:
            run.timer.cancel()
        # The command is done: nothing it started may go on running unwatched. Before the
        # reap, so its pid (the process group's id) cannot have been reused yet.
        if run.cgroup is None or run.cgroup.populated():
            self._kill(run)
        rc = run.leader.wait()
        if run.cgroup is not None:
            cg = run.cgroup
            self.loop.create_task(self._remove_cgroup(cg))
        # What is already in the pipe is logged; a leftover grandchild holding it open
        # must not keep this run alive.
        for _ in range(16):
            before = len(run.output) + run.dropped
            self._read(run)
            if len(run.output) + run.dropped == before:
                break
        self.loop.remove_reader(run.out_fd)
        os.close(run.out_fd)
        self.running.pop(run.pid, None)
        name = os.path.basename(run.hook.command[0])
        for line in run.output.decode(errors="replace").splitlines():
            log.info("hook %s for %s: %s", name, run.label, line.encode("unicode_escape").decode()
                     if not line.isprintable() else line)
        if run.dropped:
            log.info("hook %s for %s: (%d more bytes of output not logged)", name, run.label, run.dropped)
        took = time.monotonic() - run.started
        if run.killed:
            log.warning("hook %s for %s: killed after %.1fs", name, run.label, took)
        elif rc != 0:
            log.warning("hook %s for %s: exit %d after %.1fs", name, run.label, rc, took)
        else:
            log.info("hook %s for %s: done in %.2fs", name, run.label, took)
        if self.on_finished is not None:
            self.on_finished(run.label, rc, run.killed)

    async def _remove_cgroup(self, cg: JobCgroup) -> None:
        with contextlib.suppress(Exception):
            await cg.wait_empty(10.0)
        cg.remove()

    def stop(self) -> None:
        """At daemon exit: kill what is still running (an alert outliving its daemon would
        be reparented to init and never logged), its cgroup and all."""
        for run in list(self.running.values()):
            run.killed = True
            self._kill(run)
            self._exited(run)


def _own_children() -> list[int]:
    try:
        # not a job path: /proc
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
