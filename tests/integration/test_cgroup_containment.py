"""Per-launch cgroups on the real hierarchy of this machine (root; v2 writable).

Real processes in real cgroups: a job's descendant that double-forks into its own session
and scrubs its environment is still in the job's cgroup, and `cgroup.kill` plus the
inotify-woken wait for `populated 0` end it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_for
from trainsup.daemon.launch import cgroup, process
from trainsup.daemon.notices.memory import CgroupSampler
from trainsup.spec import DaemonSpec, JobSpec


def _containment(tmp_path: Path) -> cgroup.Containment:
    c = cgroup.setup(tmp_path / "state")
    if c.kind == cgroup.PROCESS_GROUP:
        pytest.skip(f"no writable cgroup here: {c.why}")
    return c


@pytest.fixture
def tree(tmp_path):
    c = _containment(tmp_path)
    yield c
    for cg in c.job_cgroups():
        cg.kill()
        wait_for(lambda cg=cg: not cg.populated(), 10, "test cgroup empty")
        cg.remove()
    for d in (c.root, c.mem_root):
        if d is not None:
            os.rmdir(d)


def _spawn(tmp_path, c, cg, script: str) -> process.Child:
    job = JobSpec("cgtest", ("sh", "-c", script), tmp_path, tmp_path / "cgtest.yaml")
    ds = DaemonSpec(tmp_path, tmp_path / "state", tmp_path / "s.sock", tmp_path)
    env = process.build_env(job, ds, {"TRAINSUP_JOB": "cgtest"})
    out = os.open(tmp_path / "out.log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return process.spawn(job, list(job.command), env, out, c, cg)
    finally:
        os.close(out)


def _pids_with(marker: str) -> list[int]:
    """Pids of `sleep MARKER` (by argv, not by environment: the escapee scrubbed it)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:-1] == [b"sleep", marker.encode()]:
                        out.append(int(d))
            except OSError:
                pass
    return out


# setsid + fork + exec with `env -i`: a sleep outside the job's process group and session,
# reparented away from the leader, with no TRAINSUP_JOB in its environment.
ESCAPE = "setsid sh -c 'env -i sleep {m} &' </dev/null >/dev/null 2>&1; exec sleep 1000"


def test_double_forking_env_scrubbing_descendant_dies_with_cgroup_kill(tmp_path, tree):
    marker = f"{4000 + os.getpid() % 1000}.{time.monotonic_ns() % 997}"
    cg = tree.create("cgtest", 1)
    child = _spawn(tmp_path, tree, cg, ESCAPE.format(m=marker))
    escaped = wait_for(lambda: _pids_with(marker), 10, "the escaped sleep")
    (pid,) = escaped
    assert os.getsid(pid) != child.pid and os.getpgid(pid) != child.pid
    assert b"TRAINSUP_JOB" not in Path(f"/proc/{pid}/environ").read_bytes()
    assert pid in cg.pids() and child.pid in cg.pids()
    assert cg.populated()

    async def stop() -> tuple[bool, float]:
        t0 = time.monotonic()
        cg.kill()
        return await cg.wait_empty(10), time.monotonic() - t0
    empty, took = asyncio.run(stop())
    child.popen.wait()
    child.close()
    assert empty and took < 5
    assert _pids_with(marker) == []
    assert cg.remove() and not cg.path.exists()
    assert asyncio.run(cg.wait_empty(1)) is True      # removed meanwhile: nothing inside


def test_wait_empty_times_out_while_a_process_remains(tmp_path, tree):
    cg = tree.create("cgtest", 2)
    child = _spawn(tmp_path, tree, cg, "exec sleep 1000")
    assert asyncio.run(cg.wait_empty(0.2)) is False
    assert not cg.remove()                       # EBUSY while populated: kept
    child.send(signal.SIGKILL)
    child.popen.wait()
    child.close()
    assert asyncio.run(cg.wait_empty(5)) is True


def test_spawn_leaves_the_daemon_in_its_own_cgroup(tmp_path, tree):
    before = Path("/proc/self/cgroup").read_text()
    cg = tree.create("cgtest", 3)
    child = _spawn(tmp_path, tree, cg, "exec sleep 1000")
    assert Path("/proc/self/cgroup").read_text() == before
    assert os.getpid() not in cg.pids()
    own_v2 = Path(f"/proc/{child.pid}/cgroup").read_text()
    assert f"/{tree.root.name}/cgtest.3" in own_v2
    # Its own session, no controlling terminal (tty_nr, field 7 of stat, is 0).
    assert os.getsid(child.pid) == child.pid
    assert int(Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[4]) == 0
    assert child.containment == tree.kind
    child.send(signal.SIGKILL)
    child.popen.wait()
    child.close()


def test_dead_daemons_job_found_by_its_cgroup_and_ended(tmp_path, tree):
    """A new Containment on the same state dir (a restarted daemon) finds the job cgroup
    still populated and empties it before any launch, whatever the state DB says."""
    marker = f"{5000 + os.getpid() % 1000}.{time.monotonic_ns() % 991}"
    cg = tree.create("cgtest", 4)
    child = _spawn(tmp_path, tree, cg, ESCAPE.format(m=marker))
    wait_for(lambda: _pids_with(marker), 10, "the escaped sleep")
    again = cgroup.setup(tmp_path / "state")
    assert again.root == tree.root
    killed = asyncio.run(again.end_leftovers(10))
    child.popen.wait()
    child.close()
    assert killed == ["cgtest.4"]
    assert _pids_with(marker) == []
    assert not cg.path.exists()


def test_another_state_dir_gets_another_tree(tmp_path, tree):
    other = cgroup.setup(tmp_path / "other-state")
    try:
        assert other.root != tree.root and other.root.parent == tree.root.parent
    finally:
        os.rmdir(other.root)
        if other.mem_root is not None:
            os.rmdir(other.mem_root)


def test_job_memory_comes_from_its_own_cgroup(tmp_path, tree):
    cg = tree.create("cgtest", 5)
    if cg.memory() == (None, None):
        pytest.skip("no memory controller reachable for job cgroups here")
    child = _spawn(tmp_path, tree, cg,
                   "exec python3 -c 'import time; b = bytearray(64 << 20); time.sleep(1000)'")
    usage = wait_for(lambda: (cg.memory()[0] or 0) >= 60 << 20 and cg.memory()[0], 15, "64 MiB charged to the job")
    assert usage < 1 << 30
    assert cg.memory()[1] in (0, None)
    sampler = CgroupSampler(cg)
    assert CgroupSampler.usable(cg) and sampler.sample() >= 60 << 20 and sampler.pids() == [child.pid]
    child.send(signal.SIGKILL)
    child.popen.wait()
    child.close()


def _proc_cgroups(pid: int) -> dict[str, str]:
    return cgroup.read_own_cgroups(f"/proc/{pid}/cgroup")


def _cgroup_dirs(pid: int) -> list[Path]:
    """The job's own cgroup dirs (v2 containment, v1 memory on a hybrid host)."""
    mounts, own = cgroup.read_mounts(), _proc_cgroups(pid)
    out = []
    if mounts.v2 is not None and "" in own:
        out.append(cgroup.join_mount(*mounts.v2, own[""]))
    if "memory" in mounts.v1 and "memory" in own:
        out.append(cgroup.join_mount(*mounts.v1["memory"], own["memory"]))
    return [d for d in out if d.parent.name.startswith("trainsup-")]


def test_daemon_makes_its_cgroup_tree_again_when_something_removed_it(daemon):
    """Found: once something else removed the daemon's empty cgroup tree, every later
    launch failed until the job was `failed`."""
    daemon.fakejob("cg", ckpt=False, extra="restart: {policy: never}\n")
    daemon.start()
    pid = daemon.wait_state("cg", "running")["pid"]
    dirs = _cgroup_dirs(pid)
    if not dirs:
        pytest.skip("jobs are not contained by cgroup here")
    trees = [d.parent for d in dirs]
    assert daemon.request("stop", "cg", no_save=True)["ok"]
    daemon.wait_state("cg", "stopped")
    wait_for(lambda: all(not d.exists() for d in dirs), 10, "the launch's cgroups removed")
    for t in trees:                       # what a cleanup script does to an empty cgroup
        os.rmdir(t)
    assert daemon.request("start", "cg")["ok"]
    st = daemon.wait_state("cg", "running", "failed", "backoff")
    assert st["state"] == "running", (st, [e for e in daemon.history("cg") if e["kind"] == "spawn-failed"])
    again = _cgroup_dirs(st["pid"])
    assert [d.parent for d in again] == trees and all(d.is_dir() for d in again), again
