"""Memory notices with real processes: a growing child noticed before its limit, and a
real kernel OOM kill inside a memory cgroup made for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled, wait_for
from trainsup.daemon.notices.memory import (
    MemoryEpisode,
    TreeSampler,
    cgroup_memory_of,
    classify_oom,
    memory_cgroup_dir,
    memory_decision,
    read_mem_available,
    read_memory_cgroup,
)
from trainsup.spec import MemorySpec

MiB = 1 << 20

GROW = r"""
import sys, time
limit = int(sys.argv[1])
chunks = []
print("ready", flush=True)
while True:
    chunks.append(bytearray(b"\x01") * (2 << 20))   # filled, so every page is resident
    if len(chunks) * (2 << 20) >= limit:
        sys.exit(3)                                  # reached the limit: too late
    time.sleep(0.01)
"""


def test_growing_child_is_noticed_before_it_reaches_the_limit():
    limit = 240 * MiB
    spec = MemorySpec(limit=limit, save_at=0.8)
    child = subprocess.Popen([sys.executable, "-c", GROW, str(limit)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        sampler, episode, actions = TreeSampler(child.pid), [MemoryEpisode()], []

        def crossed() -> bool:
            rss = sampler.sample()
            action, episode[0] = memory_decision(episode[0], rss, read_mem_available(), spec)
            if action:
                actions.append((action, rss))
            return bool(actions)
        # proc=child: a child that reached its limit first fails the wait at once
        wait_for(crossed, 30, "the crossing to be noticed", proc=child)
        action, rss = actions[0]
        assert action == "save" and 0.8 * limit <= rss < limit
        assert child.poll() is None, "noticed, but only after the child hit the limit"
    finally:
        child.kill()
        child.wait()


HOG = r"""
import sys
sys.stdin.readline()       # wait until the test has moved us into the cgroup
hog = []
while True:
    hog.append(bytearray(b"\x01") * (4 << 20))
"""


def _make_memory_cgroup(limit: int):
    """A child of our own memory cgroup with `limit`, or a skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    here, version = memory_cgroup_dir(os.getpid())
    if here is None:
        pytest.skip("no memory cgroup (v1 memory controller or v2 memory.max) is mounted")
    cg = here / f"trainsup-oomtest-{os.getpid()}"
    try:
        cg.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup under {here}: {e}")
    try:
        if version == 1:
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            # With swap the hog would be swapped out instead of killed.
            if (cg / "memory.memsw.limit_in_bytes").exists():
                (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
    except OSError as e:
        cg.rmdir()
        pytest.skip(f"cannot set a memory limit on {cg}: {e}")
    return cg, version


def _remove_cgroup(cg: Path):
    def removed() -> bool:
        try:
            cg.rmdir()
        except FileNotFoundError:
            pass
        # EBUSY until the killed process has fully left the cgroup: wait_for tries again
        return True
    wait_for(removed, 10, f"{cg} to be removable")


def test_kernel_oom_kill_inside_a_memory_cgroup_is_classified():
    limit = 64 * MiB
    cg, version = _make_memory_cgroup(limit)
    hog = None
    try:
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE, text=True)
        (cg / "cgroup.procs").write_text(str(hog.pid))
        assert memory_cgroup_dir(hog.pid) == (cg, version)
        limit_seen, before = cgroup_memory_of(hog.pid)
        assert limit_seen == limit and before is not None
        hog.stdin.write("go\n")
        hog.stdin.flush()
        hog.wait(timeout=scaled(60))
        after = read_memory_cgroup(cg, version)[1]
        assert hog.returncode == -signal.SIGKILL, f"hog ended with {hog.returncode}"
        assert after > before, "the kernel's oom_kill count did not rise"
        assert classify_oom(before, after, -hog.returncode)
        assert not classify_oom(after, after, signal.SIGKILL)   # a later, non-OOM SIGKILL
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
        _remove_cgroup(cg)
    assert not cg.exists()


def test_daemon_classifies_a_kernel_oom_kill_of_its_job(tmp_path):
    """The daemon runs inside a memory cgroup (as under systemd); its job outgrows the
    cgroup and the kernel kills it: the exit is recorded `oom-killed`, the restart `oom`."""
    import json as _json

    from conftest import DaemonProc, _kill_recorded
    cg, version = _make_memory_cgroup(400 * MiB)
    d = DaemonProc(tmp_path)
    try:
        hog = tmp_path / "hog.py"
        hog.write_text("import os, sys, time\n"
                       "rec = open(sys.argv[1], 'a'); rec.write(os.environ['TRAINSUP_RESTART_REASON'] + '\\n'); rec.close()\n"
                       "if os.environ['TRAINSUP_ATTEMPT'] != '1':\n    time.sleep(3600)\n"
                       "h = []\nwhile True:\n    h.append(bytearray(b'\\x01') * (8 << 20))\n")
        d.write_job("hog", f"name: hog\ncommand: {_json.dumps([sys.executable, str(hog), str(tmp_path / 'reasons')])}\n"
                           "restart: {backoff: {initial: 0}}\nstop_timeout: 1s\n")
        procs = cg / "cgroup.procs"
        d.start(prefix=["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"])
        st = wait_for(lambda: (s := d.status("hog"))["attempt"] >= 2 and s, 60, "the OOM kill and relaunch")
        assert st["last_exit"]["reason"] == "oom-killed", st["last_exit"]
        wait_for(lambda: (tmp_path / "reasons").read_text().split() == ["first", "oom"], 10, "the relaunch reason")
        assert d.proc.poll() is None, "the daemon itself must survive its job's OOM kill"
    finally:
        try:
            d.terminate(timeout=30)
        finally:
            _kill_recorded(tmp_path)
            _remove_cgroup(cg)
