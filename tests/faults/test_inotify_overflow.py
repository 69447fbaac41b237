"""inotify overflows (the kernel queue holds fs.inotify.max_queued_events, 16384 by
default): every valid checkpoint is still found, by the periodic rescan.

The daemon is SIGSTOPped while 20,000 files land in the watched dir, with real checkpoints
among them (first, middle, last), then continued. TRAINSUP_RESCAN_INTERVAL shortens the
daemon's periodic rescan (60 s) to 2 s.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import wait_for
from trainsup.checkpoint import write_checkpoint

RESCAN = 2.0
FLOOD = 20000


def _valid_steps(d, job) -> set:
    r = d.request("checkpoints", job)
    assert r["ok"], r
    return {c["step"] for c in r["result"] if c["valid"]}


def test_checkpoints_landing_during_an_inotify_overflow_are_found(daemon):
    ck = daemon.root / "flood-ckpt"
    daemon.fakejob("flood", "--catch-usr1", extra="  keep_last: 10\n  keep_best: 0\n")
    daemon.start(env={"TRAINSUP_RESCAN_INTERVAL": str(RESCAN)})
    daemon.wait_ready("flood")
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    assert FLOOD > limit, f"max_queued_events is {limit}: {FLOOD} files would not overflow it"
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        write_checkpoint(ck, 1, {"w": b"1"})
        for i in range(FLOOD):
            if i == FLOOD // 2:
                write_checkpoint(ck, 2, {"w": b"2"})
            fd = os.open(ck / f"junk-{i:05d}.tmp", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
        write_checkpoint(ck, 3, {"w": b"3"})
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    t0 = time.monotonic()
    wait_for(lambda: {1, 2, 3} <= _valid_steps(daemon, "flood"), RESCAN + 20, "every checkpoint after the overflow")
    found_after = time.monotonic() - t0
    # The watch still works (or the rescan covers it): a checkpoint after the flood is found.
    t1 = time.monotonic()
    write_checkpoint(ck, 4, {"w": b"4"})
    wait_for(lambda: 4 in _valid_steps(daemon, "flood"), RESCAN + 20, "a checkpoint after the flood")
    next_after = time.monotonic() - t1
    t1 = time.monotonic()
    assert daemon.status("flood")["state"] == "running"
    assert time.monotonic() - t1 < 1.0
    assert daemon.proc.poll() is None
    print(f"overflow: all checkpoints found {found_after:.2f}s after SIGCONT; the next one in {next_after:.2f}s")
