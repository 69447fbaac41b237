"""Alert hooks: commands run on `failed`, `preempted`, `saved`, `crash` and `over-quota`.

A hook is an argv (no shell), gets the event as one JSON object on stdin, and has a
timeout after which its process group is killed. Its output goes to the daemon log.
Everything happens on the event loop without waiting: the process is spawned, its pidfd
and stdout are watched by the loop, and a timer kills it. The daemon reaps only by pid
(trainsup.process.reap_orphans skips `pids()`), so a hook's exit status is never stolen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..spec import HookSpec
from .pipes import read_ready

log = logging.getLogger("trainsup.hooks")

# Spawning costs a fork; it waits this long so a crash's relaunch (scheduled by the same
# exit) is never queued behind it. Alerts are for people: 50 ms is nothing to them.
SPAWN_DELAY = 0.05
MAX_RUNNING = 32              # a crash loop of 200 jobs must not fork-bomb the host
MAX_OUTPUT = 64 << 10         # per run, logged; the rest is read and dropped
MAX_STDIN = 60 << 10          # below a pipe's buffer: one non-blocking write


def hook_event(kind: str, data: Mapping[str, Any], state_before: str | None) -> str | None:
    """The hook event (if any) for a recorded daemon event. `state_before` is the job's
    state when it was recorded: an exit while `running` is a crash; an exit during a
    save or stop flow is the daemon's own doing."""
    if kind == "state":
        return data.get("to") if data.get("to") in ("failed", "preempted") else None
    if kind == "exit":
        return "crash" if state_before == "running" and data.get("reason") != "exit 0" else None
    if kind == "spawn-failed":
        return "crash"
    if kind == "checkpoint" and data.get("took_s") is not None:
        return "saved"             # a save the daemon asked for, now valid
    if kind == "over-quota":
        return "over-quota"
    return None


@dataclass
class _Run:
    hook: HookSpec
    label: str
    popen: subprocess.Popen
    pidfd: int
    out_fd: int
    started: float = field(default_factory=time.monotonic)
    output: bytearray = field(default_factory=bytearray)
    dropped: int = 0
    timer: asyncio.TimerHandle | None = None
    killed: bool = False


class HookRunner:
    def __init__(self, loop: asyncio.AbstractEventLoop, daemon_hooks: Sequence[HookSpec] = ()):
        self.loop = loop
        self.daemon_hooks = tuple(daemon_hooks)
        self.running: dict[int, _Run] = {}
        self._states: dict[str, str] = {}
        self.host = socket.gethostname()
        self.on_finished: Callable[[str, int | None, bool], None] | None = None   # tests, bench

    def pids(self) -> set[int]:
        return set(self.running)

    def on_event(self, job: str, kind: str, data: Mapping[str, Any],
                 job_hooks: Sequence[HookSpec] = ()) -> None:
        before = self._states.get(job)
        if kind == "state" and data.get("to"):
            self._states[job] = str(data["to"])
        event = hook_event(kind, data, before)
        if event is None:
            return
        hooks = [h for h in (*self.daemon_hooks, *job_hooks) if event in h.on]
        if not hooks:
            return
        payload = {"event": event, "job": job, "at": time.time(),
                   "at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "host": self.host, "kind": kind, "data": dict(data)}
        body = json.dumps(payload, default=str).encode()[:MAX_STDIN]
        self.loop.call_later(SPAWN_DELAY, self._spawn_all, hooks, body, f"{event} {job}")

    def _spawn_all(self, hooks: Sequence[HookSpec], body: bytes, label: str) -> None:
        for hook in hooks:
            self._spawn(hook, body, label)

    def _spawn(self, hook: HookSpec, body: bytes, label: str) -> None:
        name = os.path.basename(hook.command[0])
        if len(self.running) >= MAX_RUNNING:
            log.warning("hook %s for %s not run: %d hooks still running", name, label, len(self.running))
            return
        try:
            p = subprocess.Popen(hook.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
                                 close_fds=True)
        except OSError as e:
            log.error("hook %s for %s: cannot run %s: %s", name, label, hook.command[0], e.strerror or e)
            return
        try:
            pidfd = os.pidfd_open(p.pid)
        except OSError as e:        # cannot watch it: kill rather than leak a process
            log.error("hook %s for %s: cannot watch pid %d: %s", name, label, p.pid, e.strerror)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return
        assert p.stdin is not None and p.stdout is not None
        run = _Run(hook, label, p, pidfd, p.stdout.fileno())
        self.running[p.pid] = run
        try:
            os.set_blocking(p.stdin.fileno(), False)
            os.write(p.stdin.fileno(), body)
        except (BlockingIOError, BrokenPipeError):
            pass                     # the hook did not read its stdin: its business
        finally:
            p.stdin.close()
        os.set_blocking(run.out_fd, False)
        self.loop.add_reader(run.out_fd, self._read, run)
        self.loop.add_reader(pidfd, self._exited, run)
        run.timer = self.loop.call_later(hook.timeout, self._timeout, run)

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
        try:
            os.killpg(run.popen.pid, signal.SIGKILL)   # not reaped yet: the pid is still ours
        except ProcessLookupError:
            pass

    def _exited(self, run: _Run) -> None:
        self.loop.remove_reader(run.pidfd)
        os.close(run.pidfd)
        rc = run.popen.wait()
        if run.timer is not None:
            run.timer.cancel()
        # What is already in the pipe is logged; a leftover grandchild holding it open
        # must not keep this run alive.
        for _ in range(16):
            before = len(run.output) + run.dropped
            self._read(run)
            if len(run.output) + run.dropped == before:
                break
        self.loop.remove_reader(run.out_fd)
        assert run.popen.stdout is not None
        run.popen.stdout.close()
        self.running.pop(run.popen.pid, None)
        name = os.path.basename(run.hook.command[0])
        for line in run.output.decode(errors="replace").splitlines():
            log.info("hook %s for %s: %s", name, run.label, line)
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

    def stop(self) -> None:
        """At daemon exit: kill what is still running (an alert outliving its daemon would
        be reparented to init and never logged)."""
        for run in list(self.running.values()):
            try:
                os.killpg(run.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._exited(run)
