"""The job step's leader under `trainsup run` in Slurm: `python -m trainsup.slurm.step srun ...`.

srun forwards USR1 and TERM to every task, but it takes signals in a sigwait thread, so
its SigCgt shows no handler and the daemon (which signals only processes that catch the
save signal: a USR1 kills a process that does not) would never signal it. This leader
catches them and passes each to srun, then exits with srun's status.
"""

from __future__ import annotations

import signal
import subprocess
import sys

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m trainsup.slurm.step srun ARGS...", file=sys.stderr)
        return 2
    # Handlers before srun starts (a signal then is passed on once it runs); never
    # SIG_IGN, which srun would inherit across exec.
    srun: subprocess.Popen | None = None
    early: list[int] = []

    def forward(sig: int, frame: object) -> None:
        if srun is None:
            early.append(sig)
            return
        try:
            srun.send_signal(sig)
        except ProcessLookupError:
            pass

    for s in FORWARDED:
        signal.signal(s, forward)
    try:
        # A process group of its own: a stop signals the job's group, and srun must get
        # each signal once (through here), or a second TERM makes it SIGKILL the tasks.
        srun = subprocess.Popen(argv, process_group=0)
    except OSError as e:
        print(f"trainsup: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    for sig in early:
        srun.send_signal(sig)
    rc = srun.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
