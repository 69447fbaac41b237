"""Start a job's process born inside its cgroup: clone3(CLONE_INTO_CGROUP | CLONE_PIDFD).

Why not the simpler ways (tests/bench/bench_containment.py measures them): writing a pid
into a v2 `cgroup.procs` (from the daemon around a Popen, or from a preexec_fn) takes the
kernel's global cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period
when launches are not back to back: ~8 ms median, 15 ms p90 here, many times the +2 ms
crash -> relaunch budget. clone3 with CLONE_INTO_CGROUP places the child at fork under the
lock's read side: no wait. Moving the child after it started is racy (it may fork first;
a daemon killed in between leaves a job no cgroup holds).

The clone and everything the child does until execve are in C (`_spawn.c`): a clone of
this multi-threaded daemon that ran Python would hang on a GIL drop request posted by
another thread before the clone (seen under load). Without the compiled module (no C
compiler at install) launches go through cgroup.procs instead.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

try:
    from . import _spawn  # type: ignore[attr-defined]
except ImportError as e:     # not built: launches go through cgroup.procs (slower)
    _spawn = None
    _why_missing = f"the compiled launcher is missing ({e}); reinstall trainsup with a C compiler"

SHARE_MEMORY = True     # CLONE_VM on a stack of its own where _spawn.c can (x86_64); tests try both
_STAGES = {1: "stdio", 2: "workdir", 3: "setsid", 4: "user", 5: "exec"}
_disabled: str | None = (
    _why_missing if _spawn is None
    else None if sys.platform.startswith("linux") else f"clone3 is Linux only, not {sys.platform}")


def available() -> bool:
    return _disabled is None


def why_unavailable() -> str:
    return _disabled or ""


@dataclass
class Leader:
    """The launched process, for the one mechanism that reaps it (waitpid of this pid)."""
    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def exec_candidates(file: str, env: Mapping[str, str]) -> list[bytes]:
    """The paths execvp would try for `file`, under the job's PATH."""
    if os.sep in file:
        return [os.fsencode(file)]
    return [os.fsencode(os.path.join(d or ".", file)) for d in os.get_exec_path(dict(env))]


def spawn(argv: Sequence[str] | Sequence[bytes], env: Mapping[str, str], cwd: str, stdout_fd: int, cgroup_fd: int, *,
          uid: int | None = None, gid: int | None = None,
          groups: Sequence[int] = (), stdin_fd: int | None = None,
          execs: Sequence[bytes] | None = None) -> tuple[Leader, int]:
    """Start argv in its own session, stdin /dev/null (or stdin_fd), stdout and stderr to stdout_fd,
    born in the cgroup of the open directory cgroup_fd, every signal at its default and
    the caller's signal mask. Returns (leader, pidfd). Raises OSError (FileNotFoundError
    when the command is not found) like Popen."""
    global _disabled
    if _spawn is None or _disabled is not None:
        raise OSError(errno.ENOSYS, _disabled)
    if execs is None:
        execs = exec_candidates(os.fsdecode(argv[0]), env)
    c_env = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    # not a job path: /dev/null
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) if stdin_fd is None else -1
    try:
        pid, pidfd, stage, code = _spawn.spawn(
            list(execs), [os.fsencode(a) for a in argv], c_env, os.fsencode(cwd),
            devnull if stdin_fd is None else stdin_fd, stdout_fd, cgroup_fd,
            -1 if uid is None or gid is None else uid, -1 if uid is None or gid is None else gid, list(groups), SHARE_MEMORY)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
            _disabled = f"clone3: {e.strerror}"
        raise OSError(e.errno, f"clone3: {e.strerror}") from None
    finally:
        if devnull >= 0:
            os.close(devnull)
    if stage:
        what = os.fsdecode(argv[0]) if stage == 5 else cwd if stage == 2 else _STAGES.get(stage, "start")
        raise OSError(code, os.strerror(code), what)
    return Leader(pid), pidfd
