"""Multi-node torchrun, a node's crash: trainsup's recovery against torchrun's own.

    sudo .venv/bin/python tests/bench/bench_torchrun.py [--samples 3]

Two network-namespace "hosts" (tests/multinode/netns_hosts.py), one trainsup daemon per
node, a 2-node c10d torchrun job (jobs/train_mlp.py, gloo, `--max-restarts 3`), set up as
tests/multinode/test_torchrun_netns.py does. Per sample, two crashes of node B, each
timed from the SIGKILL to "the new group logged a training step after its resume" (each
step is an all-reduce of both ranks: the group is whole again):

- trainsup: B's torchrun *agent* is SIGKILLed (the node's launcher dies; torchrun cannot
  recover from that itself). B's daemon kills the orphaned worker and relaunches B's
  torchrun; A's agent restarts its worker; the new group resumes from the checkpoint.
- torchrun --max-restarts (the peer): B's *worker* is SIGKILLed; B's agent, alive,
  restarts its worker group itself and the group re-forms; trainsup does nothing.

Both run in the same session, alternating, on the same hosts. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "multinode"))
from conftest import wait_for  # noqa: E402
from netns_hosts import NetnsHosts, NetnsUnavailable  # noqa: E402
from test_torchrun_netns import JOB, STEP_RE, Pair  # noqa: E402


def both_training_again(pair: Pair, resumes_before: int, marks: tuple[int, int], timeout: float = 180) -> None:
    """A new group resumed, then it took a step past the resume point (rank 0 logs it, on
    whichever node it is; every step is an all-reduce of both ranks: the group is whole)."""
    wait_for(lambda: len(pair.resumes()) > resumes_before, timeout, "a new 2-node group resuming", 0.05,
             detail=pair.detail)
    resumed = pair.resumes()[-1]

    def past(node, mark: int) -> bool:
        return any(int(s) > resumed for s in STEP_RE.findall(node.log()[mark:]))
    wait_for(lambda: past(pair.a, marks[0]) or past(pair.b, marks[1]), 60, "the group stepping again", 0.05,
             detail=pair.detail)


def crash(hosts, root: Path, port: int, kind: str) -> float:
    """One sample: a fresh 2-node job, node B crashed the `kind` way; seconds to recovery."""
    pair = Pair(hosts, root, port)
    try:
        pair.a.start()
        pair.b.start()
        wait_for(lambda: pair.last_step() >= 30, 180, "the 2-node group training", 0.2, detail=pair.detail)
        resumes = len(pair.resumes())
        marks = (len(pair.a.log()), len(pair.b.log()))
        if kind == "trainsup":
            victim = pair.b.d.status(JOB)["pid"]           # the torchrun agent: the node's launcher
        else:
            workers = pair.b.workers()
            assert len(workers) == 1, workers
            victim = workers[0].pid                        # the worker: torchrun's agent stays
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        both_training_again(pair, resumes, marks)
        took = time.monotonic() - t0
        if kind == "torchrun":
            assert pair.b.d.status(JOB)["restarts"] == 0, "trainsup restarted the job: not torchrun's own path"
        return took
    finally:
        pair.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    a = ap.parse_args()
    hosts = NetnsHosts()
    try:
        hosts.start()
    except NetnsUnavailable as e:
        hosts.stop()
        print(f"bench_torchrun: no network-namespace hosts here: {e}", file=sys.stderr)
        return 2
    got: dict[str, list[float]] = {"trainsup": [], "torchrun": []}
    try:
        with tempfile.TemporaryDirectory(prefix="trainsup-bench-torchrun-") as tmp:
            for i in range(a.samples):
                for j, kind in enumerate(("trainsup", "torchrun")):
                    root = Path(tmp) / f"{kind}-{i}"
                    root.mkdir()
                    took = crash(hosts.hosts, root, 29900 + 2 * i + j, kind)
                    got[kind].append(took)
                    print(f"  sample {i + 1}: {kind}: {took:.2f} s", flush=True)
    finally:
        hosts.stop()
    ours, peer = got["trainsup"], got["torchrun"]

    def q(x: list[float]) -> str:
        return f"{statistics.median(x):.2f} / {max(x):.2f} s"
    print(f"\n2-node torchrun (netns hosts, gloo, jobs/train_mlp.py), {a.samples} samples, median / max\n")
    print("| node B crash -> both nodes training again | time | ratio |")
    print("|---|---|---|")
    print(f"| trainsup: B's torchrun agent SIGKILLed, relaunched by B's daemon | {q(ours)} | "
          f"{statistics.median(ours) / statistics.median(peer):.2f}x |")
    print(f"| torchrun --max-restarts 3: B's worker SIGKILLed, restarted by B's agent | {q(peer)} | 1.00x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
