"""The OOM decision and classification (pure), and the readers on real files/processes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import wait_for
from trainsup.daemon.notices.memory import (
    MemoryEpisode,
    TreeSampler,
    classify_oom,
    memory_decision,
    read_mem_available,
    read_memory_cgroup,
)
from trainsup.spec import MemorySpec

GiB = 1 << 30
LIMIT = MemorySpec(limit=10 * GiB, save_at=0.9)                 # fires at 9 GiB, re-arms < 8.1
FLOOR = MemorySpec(min_available=2 * GiB)                       # fires < 2 GiB, re-arms >= 2.2
BOTH = MemorySpec(limit=10 * GiB, save_at=0.9, min_available=2 * GiB, action="stop")


@pytest.mark.parametrize("spec,samples,actions", [
    # (rss GiB, MemAvailable GiB or None) per sample -> the action each one gives
    (MemorySpec(), [(100, 0.1)], [None]),                         # nothing configured
    (LIMIT, [(1, None), (8.9, None), (9.0, None)], [None, None, "save"]),
    # one action per episode, however long RSS stays high
    (LIMIT, [(9.5, None), (9.9, None), (9.2, None)], ["save", None, None]),
    # dipping under the line but not 10% below it does not re-arm
    (LIMIT, [(9.1, None), (8.5, None), (9.1, None)], ["save", None, None]),
    # 10% below re-arms; the next crossing is a new episode
    (LIMIT, [(9.1, None), (8.0, None), (9.1, None)], ["save", None, "save"]),
    (FLOOR, [(1, 3.0), (1, 1.9), (1, 1.0)], [None, "save", None]),
    (FLOOR, [(1, 1.9), (1, 2.1), (1, 1.9)], ["save", None, None]),
    (FLOOR, [(1, 1.9), (1, 2.3), (1, 1.9)], ["save", None, "save"]),
    (FLOOR, [(1, None), (1, 1.0)], [None, "save"]),               # MemAvailable unknown
    # either measure starts the episode; both must recover to end it
    (BOTH, [(9.5, 5), (5, 1.0), (5, 5), (9.5, 5)], ["stop", None, None, "stop"]),
    (BOTH, [(5, 1.0), (9.5, 1.0), (8.5, 5), (5, 5), (5, 1.0)],
     ["stop", None, None, None, "stop"]),
])
def test_memory_decision_table(spec, samples, actions):
    state = MemoryEpisode()
    got = []
    for rss, avail in samples:
        action, state = memory_decision(state, int(rss * GiB),
                                        None if avail is None else int(avail * GiB), spec)
        got.append(action)
    assert got == actions


def test_memory_decision_says_why():
    _, state = memory_decision(MemoryEpisode(), 9 * GiB, None, LIMIT)
    assert state.active and "tree RSS 9.00GiB >= 0.9 x limit 10.00GiB" in state.reason


@pytest.mark.parametrize("before,after,sig,near,oom", [
    (0, 1, signal.SIGKILL, False, True),
    (3, 4, None, False, True),            # a worker was killed; the main process exited 1
    (3, 3, signal.SIGKILL, False, False),  # someone sent SIGKILL; memory was fine
    (3, 3, signal.SIGKILL, True, True),
    (None, None, signal.SIGKILL, True, True),
    (None, None, signal.SIGKILL, False, False),
    (None, 5, signal.SIGKILL, False, False),
    (None, None, signal.SIGSEGV, True, False),
])
def test_classify_oom(before, after, sig, near, oom):
    assert classify_oom(before, after, sig, near_limit=near) is oom


def test_read_mem_available(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24684544 kB\nMemFree:  1 kB\nMemAvailable:   2048 kB\n")
    assert read_mem_available(str(f)) == 2048 * 1024
    assert read_mem_available() > 0
    f.write_text("MemTotal: 1 kB\n")
    with pytest.raises(ValueError, match="no MemAvailable"):
        read_mem_available(str(f))


def test_read_memory_cgroup_v1_and_v2_shapes(tmp_path):
    # Real files laid out like cgroupfs: the tightest limit up the tree counts.
    v1 = tmp_path / "v1" / "slice" / "job"
    v1.mkdir(parents=True)
    (tmp_path / "v1" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "v1" / "slice" / "memory.limit_in_bytes").write_text(f"{16 * GiB}\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert read_memory_cgroup(v1, 1) == (16 * GiB, 2)

    v2 = tmp_path / "v2" / "job"
    v2.mkdir(parents=True)
    (tmp_path / "v2" / "memory.max").write_text("max\n")
    (v2 / "memory.max").write_text(f"{GiB}\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    assert read_memory_cgroup(v2, 2) == (GiB, 1)
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.events").unlink()
    assert read_memory_cgroup(v2, 2) == (None, None)


# Each big child says "ready" (on the parent's stdout, which it inherits) only once its
# 30 MiB are written: waiting for a total instead let the test go on while the second
# child was still allocating, and its growth then hid the killed child's drop (the test
# failed under load with "killed child still counted"). One write(2) per line: print()'s
# separate writes of text and newline interleaved under load ("readyready").
TREE = r"""
import os, subprocess, sys, time
big = "import os, time; b = bytearray(b'x') * (30 << 20); os.write(1, b'ready\\n'); time.sleep(60)"
kids = [subprocess.Popen([sys.executable, "-c", big]) for _ in range(2)]
short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
os.write(1, b"started\n")   # one write() each: lines of three writers never interleave
time.sleep(60)
"""


def _read_words(pipe, n: int, timeout: float) -> list[str]:
    """The first `n` lines written to `pipe`, waiting at most `timeout` seconds."""
    fd, buf = pipe.fileno(), b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {buf!r} within {timeout}s"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"pipe closed after {buf!r}"
            buf += chunk
    return sorted(buf.decode().split())


def test_tree_sampler_counts_children_and_survives_their_exit():
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE)
    try:
        assert _read_words(parent.stdout, 3, 30) == ["ready", "ready", "started"]
        sampler = TreeSampler(parent.pid)
        wait_for(lambda: sampler.sample() >= 60 << 20, 10, "both 30 MiB children's RSS counted")
        kids = [p for p in psutil.Process(parent.pid).children()
                if p.status() != psutil.STATUS_ZOMBIE]
        assert set(sampler.pids()) >= {p.pid for p in kids}
        big = max(kids, key=lambda p: p.memory_info().rss)
        before = sampler.sample()
        big.kill()
        wait_for(lambda: sampler.sample() <= before - (20 << 20), 10, "the killed child to drop out")
        # The Process objects of survivors are the same ones: no rediscovery.
        procs = dict(sampler._procs)
        sampler.sample()
        assert all(sampler._procs[pid] is p for pid, p in procs.items() if pid in sampler._procs)
        t0 = time.perf_counter()
        for _ in range(50):
            sampler.sample()
        per_sample_ms = (time.perf_counter() - t0) / 50 * 1000
        print(f"\nTreeSampler: {per_sample_ms:.3f} ms per sample of {len(sampler.pids())} procs")
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert TreeSampler(parent.pid).sample() == 0      # reaped: nothing to count


def test_tree_sampler_of_a_missing_pid_is_zero():
    p = subprocess.Popen(["true"])
    p.wait()
    assert TreeSampler(p.pid).sample() == 0
