"""`trainsup reexec`: the daemon replaces its own program with the version installed now,
keeping its pid, its jobs, the state-dir lock and the control socket, as `systemctl
daemon-reexec` does for systemd. An upgrade is: install the new version, `trainsup reexec`.

How. Every job runs under its shim, a child of the daemon's pid; execve keeps the pid, so
the shims stay its children, and the new program takes the jobs over exactly as after a
crash (adoption.py: the same code path, tested by both). Three file descriptors cross
the exec: the state-dir lock (the flock stays held: no other daemon can start in
between), the listening control socket (clients queue in its backlog instead of finding
no daemon) and the connection that asked, which the new program answers once it serves.

Before the exec the new version is tried: the same command line with
TRAINSUP_PREFLIGHT=1 imports the installed code and reads the configuration, then exits.
If that fails, or execve itself does, the running daemon goes on serving and the request
gets one line saying why. Refused while a job is being saved or stopped (that flow lives
in this program's memory) or runs without a shim (its output pipe would close with it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..control.server import RequestError

if TYPE_CHECKING:
    from .loop import Daemon

log = logging.getLogger("trainsup.reexec")

ENV = "TRAINSUP_REEXEC"                 # the handover, for the new program only
PREFLIGHT_ENV = "TRAINSUP_PREFLIGHT"    # `trainsup daemon|run` check their setup and exit 0
PREFLIGHT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Handover:
    lock_fd: int
    socket_fd: int
    reply_fd: int
    was: str                # the version that exec'd us
    asked_at: float         # wall time of the request


def take() -> Handover | None:
    """In the new program: what the old one handed over (removed from the environment,
    so no job or hook ever sees it)."""
    raw = os.environ.pop(ENV, None)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        h = Handover(int(d["lock"]), int(d["socket"]), int(d["reply"]), str(d["was"]), float(d["at"]))
    except (ValueError, KeyError, TypeError):
        log.error("ignoring a malformed %s handover", ENV)
        return None
    for fd in (h.lock_fd, h.socket_fd, h.reply_fd):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    return h


def command() -> list[str]:
    """The command line this daemon was started with, run by the same interpreter: the
    console script or `-m trainsup` imports whatever version is installed now."""
    return [sys.executable, *sys.orig_argv[1:]]


async def preflight(helper_pids: set[int]) -> str:
    """The new version's number, or RequestError saying why it cannot start. Its pid is in
    `helper_pids` while it runs: the daemon's SIGCHLD reaper took its exit status once,
    and asyncio reported 255 ("cannot start") for a version that started fine."""
    proc = await asyncio.create_subprocess_exec(
        *command(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, PREFLIGHT_ENV: "1"})
    helper_pids.add(proc.pid)      # before the next await: python's start-up outlasts this
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PREFLIGHT_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RequestError(f"reexec: the installed version did not start within {PREFLIGHT_TIMEOUT:g}s; "
                           f"still serving trainsup {__version__}") from None
    finally:
        helper_pids.discard(proc.pid)
    lines = out.decode(errors="replace").split()
    if proc.returncode != 0 or not lines:
        why = (err.decode(errors="replace").strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise RequestError(f"reexec: the installed version cannot start ({why}); "
                           f"still serving trainsup {__version__}")
    return lines[-1]


async def reexec(d: Daemon, reply_fd: int) -> Any:
    """Replace this program (see the module doc). Returns only by raising RequestError."""
    every = list(d.jobs.values()) + list(d.retired_jobs())
    busy = sorted({j.name for j in every if j.busy or j.state.value in ("saving", "stopping")})
    if busy:
        raise RequestError(f"reexec: {', '.join(busy)} {'is' if len(busy) == 1 else 'are'} being saved or "
                           f"stopped; try again when that is done")
    bare = sorted(j.name for j in every if j.child is not None and j.child.shim_pid is None)
    if bare:
        raise RequestError(f"reexec: {', '.join(bare)} run{'s' if len(bare) == 1 else ''} without a shim "
                           f"(its output would be cut); stop {'it' if len(bare) == 1 else 'them'} first")
    new = await preflight(d.helper_pids)
    sock_fd = d.control.listening_fd()
    if sock_fd is None:
        raise RequestError(f"reexec: the control socket is not open; still serving trainsup {__version__}")
    fds = (d.lock.fd, sock_fd, reply_fd)
    env = {**os.environ, ENV: json.dumps({"lock": d.lock.fd, "socket": sock_fd, "reply": reply_fd,
                                          "was": __version__, "at": time.time()})}
    log.warning("re-executing %s (trainsup %s -> %s); jobs keep running", " ".join(command()), __version__, new)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # Holding the database lock: no thread is half-way through a commit when the exec
    # ends every thread; what is queued is committed first.
    with d.db.lock:
        d.db.flush()
        for fd in fds:
            os.set_inheritable(fd, True)
        try:
            os.execve(sys.executable, command(), env)
        except OSError as e:
            why = e.strerror or str(e)
        for fd in fds:
            os.set_inheritable(fd, False)
    log.error("reexec: cannot execute %s: %s; still serving", sys.executable, why)
    raise RequestError(f"reexec: cannot execute {sys.executable}: {why}; still serving trainsup {__version__}")


def answer(h: Handover, result: dict) -> None:
    """In the new program, once it serves: the reply to the `reexec` request."""
    try:
        os.write(h.reply_fd, json.dumps({"ok": True, "result": result}).encode() + b"\n")
    except OSError as e:
        log.info("reexec: the client that asked is gone (%s)", e.strerror)
    finally:
        os.close(h.reply_fd)
