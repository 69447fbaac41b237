"""Notices that arrive while `trainsup run` is still starting (imports take ~1 s).

Slurm may send the time-limit USR1 up to 60 s early, so with a short limit it can come
the moment the batch step starts: by default USR1 (and TERM) would kill the process and
the job would end FAILED, never requeued. `python -m trainsup run` records them from its
first line on, and RunDaemon acts on them once its loop runs.
"""

from __future__ import annotations

import signal

CAUGHT = (signal.SIGUSR1, signal.SIGTERM)
pending: list[int] = []


def _record(signum: int, frame: object) -> None:
    pending.append(signum)


def catch() -> None:
    for s in CAUGHT:
        signal.signal(s, _record)


def take() -> list[int]:
    """The signals recorded so far (each once); call after the real handlers are in."""
    out = list(pending)
    pending.clear()
    return out
