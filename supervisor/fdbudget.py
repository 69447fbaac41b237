"""The daemon's file-descriptor budget: jobs never take the fds the control socket and the
state DB need.

Each job holds fds for its life (its checkpoint dir, a log file, a pidfd, the log pipe, its
cgroup's event watch). Without a budget, jobs enough to reach `nofile` leave nothing for
`accept()`: `status` goes unanswered exactly when it is needed. A launch (and a held
checkpoint dir) is refused with one line instead, once fewer than RESERVED fds would stay
free; the control server keeps its own connection budget inside what is left.
"""

from __future__ import annotations

import os
import resource

RESERVED = 96          # the control socket's connections, the state DB, logs, hashing, a spare
PER_LAUNCH = 8         # what one launch takes (pipe, pidfd, log file, cgroup fds), rounded up
# Open scrapes of the metrics endpoint at once (metrics_http.py); the control socket's
# connection budget leaves room for them.
METRICS_CONNECTIONS = 16


class Exhausted(OSError):
    pass


def _soft_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def check(needed: int = PER_LAUNCH, what: str = "start a job") -> None:
    """Raise Exhausted when taking `needed` more fds would eat into the reserve."""
    limit = _soft_limit()
    # The lowest free fd is a cheap lower bound of the count (two syscalls); count exactly
    # only when it comes near the limit.
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    if fd + needed + RESERVED < limit:
        return
    used = in_use()
    if used + needed + RESERVED >= limit:
        raise Exhausted(24, f"too many open files: {used} of the daemon's limit {limit} in use, "
                            f"{RESERVED} kept for the control socket and state; cannot {what} "
                            f"(raise LimitNOFILE / ulimit -n)")
