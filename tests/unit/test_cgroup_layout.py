"""Where a daemon puts its job cgroups, as a table over host layouts.

The layouts are files under tmp_path shaped like /proc/self/mountinfo, /proc/self/cgroup
and the cgroup filesystems (a real cgroupfs creates `cgroup.procs` in every new folder; the
fake one gets them written by the test). The real hierarchy is exercised in
tests/integration/test_cgroup_containment.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainsup.daemon.launch import cgroup
from trainsup.daemon.launch.cgroup import CGROUP_V1, CGROUP_V2, PROCESS_GROUP

HYBRID_MOUNTS = """\
31 23 0:28 / {r}/fs rw - tmpfs tmpfs rw
32 31 0:29 / {r}/fs/memory rw - cgroup cgroup rw,memory
33 31 0:30 / {r}/fs/pids rw - cgroup cgroup rw,pids
34 31 0:31 / {r}/fs/unified rw - cgroup2 cgroup2 rw
"""
HYBRID_OWN = "4:memory:/init.scope\n3:pids:/init.scope\n0::/init.scope\n"
PURE_V2_MOUNTS = "30 23 0:27 / {r}/fs rw - cgroup2 cgroup2 rw\n"
PURE_V2_OWN = "0::/system.slice/trainsup.service\n"
V1_ONLY_MOUNTS = "32 31 0:29 / {r}/fs/pids rw - cgroup cgroup rw,pids\n"
V1_ONLY_OWN = "3:pids:/user.slice\n"
CONTAINER_MOUNTS = "34 31 0:31 /kubepods/pod1 {r}/fs rw - cgroup2 cgroup2 rw\n"
CONTAINER_OWN = "0::/kubepods/pod1/c1\n"


def _layout(tmp: Path, mounts: str, own: str, dirs: dict[str, str]) -> tuple[str, str]:
    (tmp / "mountinfo").write_text(mounts.format(r=tmp))
    (tmp / "cgroup").write_text(own)
    for rel, controllers in dirs.items():
        d = tmp / "fs" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.controllers").write_text(controllers)
    return str(tmp / "mountinfo"), str(tmp / "cgroup")


def _writable(tmp: Path, *rels: str) -> None:
    """What the kernel does on mkdir in a cgroupfs: the control files exist."""
    for rel in rels:
        d = tmp / "fs" / rel
        d.mkdir(parents=True, exist_ok=True)
        for f in ("cgroup.procs", "tasks", "cgroup.subtree_control"):
            (d / f).write_text("")


STATE = "/var/lib/trainsup-test"
NAME = cgroup.tree_name(STATE)


@pytest.mark.parametrize("case,mounts,own,dirs,writable,kind,root,home,mem_root", [
    ("hybrid host: v2 tree, v1 memory per launch", HYBRID_MOUNTS, HYBRID_OWN,
     {"unified/init.scope": ""}, [f"unified/init.scope/{NAME}", f"memory/init.scope/{NAME}"],
     CGROUP_V2, f"unified/init.scope/{NAME}", "unified/init.scope", f"memory/init.scope/{NAME}"),
    ("pure v2 without controllers", PURE_V2_MOUNTS, PURE_V2_OWN,
     {"system.slice/trainsup.service": ""}, [f"system.slice/trainsup.service/{NAME}"],
     CGROUP_V2, f"system.slice/trainsup.service/{NAME}", "system.slice/trainsup.service", None),
    ("delegated v2 with memory: the daemon moves into a leaf", PURE_V2_MOUNTS, PURE_V2_OWN,
     {"system.slice/trainsup.service": "memory pids"},
     ["system.slice/trainsup.service", f"system.slice/trainsup.service/{NAME}.daemon",
      f"system.slice/trainsup.service/{NAME}"],
     CGROUP_V2, f"system.slice/trainsup.service/{NAME}", f"system.slice/trainsup.service/{NAME}.daemon", None),
    ("restarted inside its leaf: the same tree", PURE_V2_MOUNTS,
     f"0::/system.slice/trainsup.service/{NAME}.daemon\n",
     {f"system.slice/trainsup.service/{NAME}.daemon": ""}, [f"system.slice/trainsup.service/{NAME}"],
     CGROUP_V2, f"system.slice/trainsup.service/{NAME}", f"system.slice/trainsup.service/{NAME}.daemon", None),
    ("container: mount root stripped", CONTAINER_MOUNTS, CONTAINER_OWN, {"c1": ""}, [f"c1/{NAME}"],
     CGROUP_V2, f"c1/{NAME}", "c1", None),
    ("v1 only", V1_ONLY_MOUNTS, V1_ONLY_OWN, {"pids/user.slice": ""}, [f"pids/user.slice/{NAME}"],
     CGROUP_V1, f"pids/user.slice/{NAME}", "pids/user.slice", None),
    ("nothing writable", PURE_V2_MOUNTS, PURE_V2_OWN, {"system.slice/trainsup.service": ""}, [],
     PROCESS_GROUP, None, None, None),
    ("no cgroup mounted", "", "", {}, [], PROCESS_GROUP, None, None, None),
])
def test_setup_picks_the_tree(tmp_path, case, mounts, own, dirs, writable, kind, root, home, mem_root):
    mi, pc = _layout(tmp_path, mounts, own, dirs)
    _writable(tmp_path, *writable)
    c = cgroup.setup(STATE, mountinfo=mi, proc_cgroup=pc)
    fs = tmp_path / "fs"
    assert c.kind == kind, (case, c.why)
    assert c.root == (fs / root if root else None), case
    assert c.home == (fs / home if home else None), case
    assert c.mem_root == (fs / mem_root if mem_root else None), case
    if kind == PROCESS_GROUP:
        assert c.why and c.create("job", 1) is None


def test_delegated_v2_moves_the_daemon_and_hands_controllers_down(tmp_path):
    mi, pc = _layout(tmp_path, PURE_V2_MOUNTS, PURE_V2_OWN, {"system.slice/trainsup.service": "memory pids"})
    base = "system.slice/trainsup.service"
    _writable(tmp_path, base, f"{base}/{NAME}.daemon", f"{base}/{NAME}")
    cgroup.setup(STATE, mountinfo=mi, proc_cgroup=pc)
    fs = tmp_path / "fs" / base
    assert (fs / f"{NAME}.daemon" / "cgroup.procs").read_text() == "0"
    assert (fs / "cgroup.subtree_control").read_text() == "+memory +pids"


@pytest.mark.parametrize("a,b,same", [
    ("/var/lib/trainsup", "/var/lib/trainsup", True),
    ("/var/lib/trainsup", "/var/lib/trainsup/", True),
    ("/var/lib/trainsup", "/var/lib/trainsup/../trainsup", True),
    ("/var/lib/trainsup", "/var/lib/trainsup2", False),
    ("/srv/a/state", "/srv/b/state", False),
])
def test_tree_name_two_daemons_never_collide(a, b, same):
    assert (cgroup.tree_name(a) == cgroup.tree_name(b)) is same
    assert cgroup.tree_name(a).startswith("trainsup-") and len(cgroup.tree_name(a)) == 19


@pytest.mark.parametrize("files,usage,ooms", [
    ({"memory.current": "1048576\n", "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n"}, 1048576, 2),
    ({"memory.current": "5\n"}, 5, None),
    ({}, None, None),
])
def test_v2_memory_counters(tmp_path, files, usage, ooms):
    for k, v in files.items():
        (tmp_path / k).write_text(v)
    assert cgroup.JobCgroup(tmp_path, 2).memory() == (usage, ooms)


@pytest.mark.parametrize("usage,stat,oom_control,expected", [
    ("3000\n", "cache 100\ntotal_inactive_file 1000\n", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n", (2000, 1)),
    ("3000\n", "", "oom_kill_disable 0\n", (3000, None)),
    ("100\n", "total_inactive_file 1000\n", "oom_kill 0\n", (0, 0)),
])
def test_v1_memory_counters_on_a_hybrid_host(tmp_path, usage, stat, oom_control, expected):
    mem = tmp_path / "mem"
    mem.mkdir()
    (mem / "memory.usage_in_bytes").write_text(usage)
    (mem / "memory.stat").write_text(stat)
    (mem / "memory.oom_control").write_text(oom_control)
    assert cgroup.JobCgroup(tmp_path / "v2", 2, mem).memory() == expected


@pytest.mark.parametrize("events,populated", [
    ("populated 1\nfrozen 0\n", True),
    ("populated 0\nfrozen 0\n", False),
    (None, False),            # removed: nothing can be inside
])
def test_populated_reads_cgroup_events(tmp_path, events, populated):
    if events is not None:
        (tmp_path / "cgroup.events").write_text(events)
    assert cgroup.JobCgroup(tmp_path, 2).populated() is populated
