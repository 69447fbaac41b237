"""What per-launch cgroups cost and buy, measured against today's mechanism in one run.

    sudo .venv/bin/python tests/bench/bench_containment.py [--rounds 300] [--procs 500]

1. crash -> relaunch inside the launcher: from "the exit is known" (waitpid returned) to
   "the next process exists" (Popen returned). Bare Popen loop vs the cgroup path trainsup
   takes (check the old cgroup is empty, create the next one, clone3 into it, remove the
   old one), rounds interleaved so both see the same machine; each attempt runs 20 ms
   before it exits, like a crash, since the kernel's cost of a cgroup.procs write depends
   on the time since the last one. Also
   the rejected options, for the record: the daemon entering the cgroup around a Popen,
   and a preexec_fn writing cgroup.procs.
2. stop of a job with N processes until nothing of it is left: cgroup.kill + the
   inotify-woken wait for `populated 0`, vs killpg + the descendant sweep (today's stop)
   followed by polling until every process is gone.

Needs root and a writable cgroup v2 hierarchy; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import wait_for  # noqa: E402
from trainsup.daemon.launch import cgroup, process  # noqa: E402 (the repository, not an installed copy)

TRUE = ["/bin/true"]
RUN = ["/bin/sleep", "0.02"]      # an attempt that runs a little, then exits: the "crash"


def q(samples: list[float]) -> str:
    s = sorted(samples)
    return f"{statistics.median(s):7.3f} / {s[int(len(s) * 0.95) - 1]:7.3f}"


def bare_round() -> float:
    p = subprocess.Popen(RUN, process_group=0, stdin=subprocess.DEVNULL)
    p.wait()
    t0 = time.perf_counter()
    nxt = subprocess.Popen(TRUE, process_group=0, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    nxt.wait()
    return dt * 1e3


class CgroupLauncher:
    """trainsup's launch path: process.spawn into a fresh cgroup (clone3 where available)."""

    def __init__(self, tree: cgroup.Containment, work: Path, self_move: bool = False):
        from trainsup.spec import JobSpec
        self.tree = tree
        self.job = JobSpec("bench", tuple(TRUE), work, work / "bench.yaml")
        self.out = os.open(os.devnull, os.O_WRONLY)
        self.self_move = self_move
        self.n = 0
        self.cg = None

    def launch(self, argv: list[str] = TRUE):
        self.n += 1
        self.cg = self.tree.create("bench-move" if self.self_move else "bench", self.n)
        if self.self_move:
            with self.tree.entered(self.cg):
                return subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        child = process.spawn(self.job, argv, {}, self.out, self.tree, self.cg)
        os.close(child.pidfd)
        return child.popen

    def round(self) -> float:
        p = self.launch(RUN)
        p.wait()
        t0 = time.perf_counter()
        old = self.cg
        if old.populated():              # leftovers of the dead attempt: through the cgroup
            old.kill()
        nxt = self.launch()
        dt = time.perf_counter() - t0
        old.remove()                     # after the relaunch: not on its path
        nxt.wait()
        self.cg.remove()
        return dt * 1e3


def preexec_round(tree: cgroup.Containment, n: int) -> float:
    subprocess.Popen(RUN, process_group=0, stdin=subprocess.DEVNULL).wait()
    cg = tree.create("bench-pre", n)
    procs = str(cg.path / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write("0")
    t0 = time.perf_counter()
    p = subprocess.Popen(TRUE, start_new_session=True, preexec_fn=enter,  # noqa: PLW1509 (the rejected option)
                         stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    p.wait()
    cg.remove()
    return dt * 1e3


# --- stop of a job with many processes --------------------------------------------------

def many(n: int) -> list[str]:
    return ["sh", "-c", f"i=0; while [ $i -lt {n} ]; do sleep 1000 & i=$((i+1)); done; wait"]


def _spawn_many(n: int, tree, cg, work: Path) -> process.Child:
    from trainsup.spec import JobSpec
    job = JobSpec("bench", tuple(many(n)), work, work / "bench.yaml")
    child = process.spawn(job, list(job.command), {"PATH": os.environ["PATH"]}, os.open(os.devnull, os.O_WRONLY),
                          tree, cg)
    wait_for(lambda: len(process.descendants(child.pid)) >= n, 60, "the job's process count", 0.01)
    return child


def _alive(pids: list[int]) -> bool:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] != b"Z":
                    return True
        except OSError:
            continue
    return False


def stop_old(n: int, tree, work: Path) -> float:
    child = _spawn_many(n, None, None, work)
    tree_pids = [child.pid] + process.descendants(child.pid)
    t0 = time.perf_counter()
    child.refresh_tree()
    child.signal_group(signal.SIGKILL)
    process.kill_leftovers(child)
    while _alive(tree_pids):
        time.sleep(0.0005)
    dt = time.perf_counter() - t0
    child.popen.wait()
    child.close()
    process.reap_orphans([])
    return dt * 1e3


def stop_cgroup(n: int, tree, work: Path, k: int) -> float:
    cg = tree.create("bench-stop", k)
    child = _spawn_many(n, tree, cg, work)

    async def stop() -> float:
        t0 = time.perf_counter()
        cg.kill()
        assert await cg.wait_empty(30)
        return time.perf_counter() - t0
    dt = asyncio.run(stop())
    child.popen.wait()
    child.close()
    process.reap_orphans([])
    cg.remove()
    return dt * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--procs", type=int, default=500)
    ap.add_argument("--stops", type=int, default=5)
    a = ap.parse_args()
    process.become_subreaper()
    # Like the daemon: a few idle threads (hashing pool, inotify observer, scheduler). A
    # cgroup.procs write moves every thread of the process; clone3 moves none.
    for _ in range(4):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="trainsup-bench-cg-") as tmp:
        work = Path(tmp)
        tree = cgroup.setup(work / "state")
        if tree.kind != cgroup.CGROUP_V2:
            raise SystemExit(f"needs a writable cgroup v2 hierarchy: {tree.kind} ({tree.why})")
        try:
            launcher = CgroupLauncher(tree, work)
            mover = CgroupLauncher(tree, work, self_move=True)
            bare, cg, pre, move = [], [], [], []
            for i in range(a.rounds):           # interleaved: the same machine for each
                bare.append(bare_round())
                cg.append(launcher.round())
                if i < a.rounds // 3:
                    move.append(mover.round())
                    pre.append(preexec_round(tree, i))
            old = [stop_old(a.procs, tree, work) for _ in range(a.stops)]
            new = [stop_cgroup(a.procs, tree, work, k) for k in range(a.stops)]
        finally:
            for c in tree.job_cgroups():
                c.kill()
                c.remove()
            os.rmdir(tree.root)
            if tree.mem_root is not None:
                os.rmdir(tree.mem_root)
    d = statistics.median(cg) - statistics.median(bare)
    print(f"{'measure (ms, median / p95)':62s} {'ours':>17s}   {'peer':>17s}   delta")
    print(f"{'exit known -> next launch, cgroup per launch (clone3)':62s} {q(cg)}   {q(bare)}   "
          f"{d:+.3f} (budget +2.000) n={len(cg)}")
    print(f"{'  rejected: daemon enters cgroup.procs around Popen':62s} {q(move)}   {q(bare)}   "
          f"{statistics.median(move) - statistics.median(bare):+.3f} n={len(move)}")
    print(f"{'  rejected: preexec_fn writes cgroup.procs (forks)':62s} {q(pre)}   {q(bare)}   "
          f"{statistics.median(pre) - statistics.median(bare):+.3f} n={len(pre)}")
    print(f"{f'stop of a job with {a.procs} processes -> nothing left':62s} {q(new)}   {q(old)}   "
          f"{statistics.median(new) - statistics.median(old):+.3f} (peer: killpg + sweep) n={len(new)}")


if __name__ == "__main__":
    main()
