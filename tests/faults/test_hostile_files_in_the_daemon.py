"""A job's files cannot freeze the daemon: the findings about the daemon, reproduced with a
real daemon the way they were found (the readers' own regressions: tests/unit/test_hostile_files.py)."""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from pathlib import Path

from conftest import wait_for

_RENAME_EXCHANGE = 2


def _exchange(dir_fd: int, a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(dir_fd, a.encode(), dir_fd, b.encode(), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Swapper(threading.Thread):
    """Exchanges a file with a FIFO every `every` seconds (renameat2), as the hostile job did."""

    def __init__(self, d: Path, name: str, every: float = 0.02):
        super().__init__(daemon=True)
        self.d, self.name, self.every = d, name, every
        self.stop_ = threading.Event()
        self.swaps = 0
        os.mkfifo(d / ".fifo")

    def run(self) -> None:
        fd = os.open(self.d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not self.stop_.wait(self.every):
                _exchange(fd, self.name, ".fifo")
                self.swaps += 1
        finally:
            os.close(fd)

    def release(self) -> None:
        """Stop, and open both names for writing so that a reader stuck on the FIFO (a
        regression) wakes up and the test fails instead of hanging."""
        self.stop_.set()
        self.join(5)
        for n in (self.name, ".fifo"):
            try:
                os.close(os.open(self.d / n, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass


def _status_times(daemon, job: str, seconds: float) -> list[float]:
    """Answer times of `status`, asked again and again for `seconds` (each within 10 s or
    the test fails: the loop is frozen)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        r = daemon.request("status", job, timeout=10)
        assert r["ok"], r
        out.append(time.monotonic() - t)
        time.sleep(0.1)
    return out


def test_hf_trainer_state_json_exchanged_with_a_fifo_every_20ms_never_freezes_the_loop(daemon):
    """Found: rotation passes read HF's best step from trainer_state.json on the event
    loop, blocking; a job exchanging it with a FIFO every 20 ms froze the daemon within
    about 10 passes (no status, no supervision, SIGTERM not handled)."""
    ck = daemon.root / "hf-out"
    for step in (2, 4):
        e = ck / f"checkpoint-{step}"
        e.mkdir(parents=True)
        (e / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                          "best_model_checkpoint": str(ck / "checkpoint-2")}))
    daemon.fakejob("hf", "--catch-usr1", ckpt=False, extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 5\n")
    daemon.start()
    daemon.wait_ready("hf")
    wait_for(lambda: len(daemon.request("checkpoints", "hf")["result"]) >= 2, 15, "both HF entries indexed")
    sw = Swapper(ck / "checkpoint-4", "trainer_state.json")
    sw.start()
    try:
        # each exchange is a change in the dir: scans and rotation passes (1 s apart) go on
        # all along; 20 s is about 20 passes, twice what froze the daemon
        times = _status_times(daemon, "hf", 20)
    finally:
        sw.release()
    assert sw.swaps > 200, sw.swaps
    assert max(times) < 5, f"status took {max(times):.2f}s while the FIFO was swapped"
    assert daemon.status("hf")["state"] == "running"
    # still supervising and still indexing: a save of the job lands and is listed
    t = time.monotonic()
    assert daemon.terminate(timeout=30) == 0
    assert time.monotonic() - t < 30
