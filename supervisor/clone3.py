"""Start a job's process born inside its cgroup: clone3(CLONE_INTO_CGROUP | CLONE_PIDFD).

Why not the simpler ways (tests/bench/bench_containment.py measures them): writing a pid
into a v2 `cgroup.procs` (from the daemon around a Popen, or from a preexec_fn) takes the
kernel's global cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period
when launches are not back to back: ~8 ms median, 15 ms p90 here, many times the +2 ms
crash -> relaunch budget. clone3 with CLONE_INTO_CGROUP places the child at fork under the
lock's read side: no wait. Moving the child after it started is racy (it may fork first;
a daemon killed in between leaves a job no cgroup holds).

The child is a copy of the daemon without its other threads, so between clone3 and execve
it makes only async-signal-safe libc calls through ctypes, with every argument built
beforehand in the parent: no malloc (another thread may have held malloc's lock at the
clone), raw set*id syscalls (glibc's setxid would try to reach the parent's threads),
every signal blocked until all handlers are back to default (a Python handler in the
child would write to the daemon's own wakeup pipe), and the GC off (no finalizer runs).
"""

from __future__ import annotations

import _signal as csignal  # the C module: no enum conversions (signal's wrappers cost ~300 us a launch)
import ctypes
import errno
import gc
import os
import platform
import select
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Syscall numbers differ by architecture (clone3 and close_range are in the generic table).
_SYSCALLS = {
    "x86_64": {"clone3": 435, "close_range": 436, "setgroups": 116, "setresuid": 117, "setresgid": 119},
    "aarch64": {"clone3": 435, "close_range": 436, "setgroups": 159, "setresuid": 147, "setresgid": 149},
}
_NR = _SYSCALLS.get(platform.machine())
_CLONE_PIDFD = 0x00001000
_CLONE_INTO_CGROUP = 0x200000000
_CLOSE_RANGE_CLOEXEC = 1 << 2
_SIG_DFL = 0
EXEC_TIMEOUT = 5.0       # clone -> exec normally takes well under a millisecond
_STAGES = {1: "stdio", 2: "workdir", 3: "setsid", 4: "user", 5: "exec"}


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
        "tls", "set_tid", "set_tid_size", "cgroup")]


# PyDLL: the GIL stays held across the call, so the child wakes up holding it. Every
# function object is resolved here, once: a first lookup (dlsym) in the child could malloc.
_libc = ctypes.PyDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_dup2, _chdir, _setsid, _execve, _write, _exit = (
    _libc.dup2, _libc.chdir, _libc.setsid, _libc.execve, _libc.write, _libc._exit)
_signal = _libc.signal
_signal.restype = ctypes.c_void_p
_signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
_sigprocmask = _libc.sigprocmask
_get_errno = ctypes.get_errno
_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_ALL_SIGNALS = frozenset(int(s) for s in signal.valid_signals())
_RESETTABLE = tuple(sorted(_ALL_SIGNALS - {int(s) for s in _UNCATCHABLE}))
_disabled: str | None = None if _NR is not None else f"no syscall table for {platform.machine()}"


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


def _c_strings(items: Sequence[bytes]) -> ctypes.Array:
    arr = (ctypes.c_char_p * (len(items) + 1))()
    arr[:-1] = list(items)
    arr[-1] = None
    return arr


def _exec_candidates(file: str, env: Mapping[str, str]) -> list[bytes]:
    if os.sep in file:
        return [os.fsencode(file)]
    return [os.fsencode(os.path.join(d or ".", file)) for d in os.get_exec_path(dict(env))]


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str, stdout_fd: int, cgroup_fd: int, *,
          uid: int | None = None, gid: int | None = None,
          groups: Sequence[int] = ()) -> tuple[Leader, int]:
    """Start argv in its own session, stdin /dev/null, stdout and stderr to stdout_fd,
    born in the cgroup of the open directory cgroup_fd. Returns (leader, pidfd). Raises
    OSError (FileNotFoundError when the command is not found) like Popen."""
    global _disabled
    if _NR is None:
        raise OSError(errno.ENOSYS, _disabled)
    nr = _NR
    paths = [ctypes.c_char_p(p) for p in _exec_candidates(argv[0], env)]
    c_argv = _c_strings([os.fsencode(a) for a in argv])
    c_env = _c_strings([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()])
    c_cwd = ctypes.c_char_p(os.fsencode(cwd))
    c_groups = (ctypes.c_uint * max(1, len(groups)))(*groups)
    report = (ctypes.c_int * 2)()
    pidfd = ctypes.c_int(-1)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    rpipe, wpipe = os.pipe2(os.O_CLOEXEC)
    # No CLONE_VFORK: the clone is a copy of a multi-threaded process, and a lock another
    # thread held at that instant (seen under load: the child parked in a futex before its
    # exec) would freeze the daemon inside clone3 for good. Without it the daemon only
    # waits, bounded, for the exec report below, and kills a clone that never gets there.
    args = _CloneArgs(flags=_CLONE_INTO_CGROUP | _CLONE_PIDFD, pidfd=ctypes.addressof(pidfd),
                      exit_signal=signal.SIGCHLD, cgroup=cgroup_fd)
    # The mask the job starts with (the daemon's, as Popen leaves it), as a sigset_t.
    old_mask = csignal.pthread_sigmask(signal.SIG_BLOCK, ())
    c_old_mask = (ctypes.c_ulong * 16)()
    for s in old_mask:
        c_old_mask[(int(s) - 1) // 64] |= 1 << ((int(s) - 1) % 64)
    # Only dispositions that are not the default need resetting in the child (each call
    # there costs copy-on-write faults while the parent waits).
    getsignal, dfl = csignal.getsignal, csignal.SIG_DFL
    to_reset = [s for s in _RESETTABLE if getsignal(s) not in (dfl, None)]
    L = ctypes.c_long
    steps: list = [(_signal, (sig, _SIG_DFL), 0) for sig in to_reset]
    steps += [(_dup2, (devnull, 0), 1), (_dup2, (stdout_fd, 1), 1), (_dup2, (stdout_fd, 2), 1),
              (_chdir, (c_cwd,), 2), (_setsid, (), 3)]
    if uid is not None and gid is not None:
        steps += [(_syscall, (L(nr["setgroups"]), L(len(groups)), c_groups), 4),
                  (_syscall, (L(nr["setresgid"]), L(gid), L(gid), L(gid)), 4),
                  (_syscall, (L(nr["setresuid"]), L(uid), L(uid), L(uid)), 4)]
    # Every other inherited fd closes at exec (the error pipe too, which says "started").
    steps += [(_syscall, (L(nr["close_range"]), L(3), L(0xFFFFFFFF), L(_CLOSE_RANGE_CLOEXEC)), 5),
              (_sigprocmask, (2, c_old_mask, None), 5)]          # SIG_SETMASK: the daemon's mask
    _get_errno()        # ctypes' per-thread errno slot exists before the clone
    gc_was = gc.isenabled()
    gc.disable()
    csignal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        pid = _syscall(ctypes.c_long(nr["clone3"]), ctypes.byref(args), ctypes.c_long(ctypes.sizeof(args)))
        if pid == 0:
            _child(steps, paths, c_argv, c_env, report, wpipe)
        err = _get_errno()
    finally:
        csignal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if gc_was:
            gc.enable()
        os.close(wpipe)
        os.close(devnull)
    try:
        if pid < 0:
            if err in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
                _disabled = f"clone3: {os.strerror(err)}"
            raise OSError(err, f"clone3: {os.strerror(err)}")
        data = b""
        deadline = time.monotonic() + EXEC_TIMEOUT
        while True:                 # EOF: the exec closed the pipe (CLOEXEC): it started
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rpipe], [], [], left)[0]:
                signal.pidfd_send_signal(pidfd.value, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(pidfd.value)
                raise OSError(errno.ETIMEDOUT, f"the new process did not reach exec within "
                                               f"{EXEC_TIMEOUT:g}s (killed); the launch is retried")
            chunk = os.read(rpipe, 8 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rpipe)
    if data:
        stage, code = int.from_bytes(data[:4], "little"), int.from_bytes(data[4:8], "little")
        os.waitpid(pid, 0)
        os.close(pidfd.value)
        what = argv[0] if stage == 5 else cwd if stage == 2 else _STAGES.get(stage, "start")
        raise OSError(code, os.strerror(code), what)
    return Leader(pid), pidfd.value


def _child(steps: list, execs: list, c_argv: ctypes.Array, c_env: ctypes.Array,
           report: ctypes.Array, wpipe: int) -> None:
    """In the clone, until execve: prebuilt calls only (each Python operation here costs
    copy-on-write faults while the parent waits). Never returns."""
    stage = 0
    try:
        for fn, args, step in steps:
            stage = step
            if fn(*args) < 0:
                report[1] = _get_errno()
                raise OSError
        stage = 5
        first_error = 0
        for path in execs:
            _execve(path, c_argv, c_env)
            e = _get_errno()
            if e not in (errno.ENOENT, errno.ENOTDIR) and not first_error:
                first_error = e
        report[1] = first_error or errno.ENOENT
        raise OSError
    except BaseException:   # noqa: BLE001 (in the clone: whatever failed, report it and _exit)
        report[0] = stage
        _write(wpipe, report, 8)
    finally:
        _exit(127)
