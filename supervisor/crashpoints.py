"""Named crash points between the daemon's durable steps, for fault-injection tests.

`TRAINSUP_CRASH_AT=<point>` in the daemon's environment makes it SIGKILL itself at that
point (once: the file TRAINSUP_CRASH_ONCE names, if set, is created on the first crash so a
restarted daemon runs through). Points: state-write, trash-rename, delete, launched (a process
exists, its pid not yet durable), spawn, record.
"""

import os
import signal

_POINT = os.environ.get("TRAINSUP_CRASH_AT")


def crash_point(name: str) -> None:
    if _POINT != name:
        return
    once = os.environ.get("TRAINSUP_CRASH_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
