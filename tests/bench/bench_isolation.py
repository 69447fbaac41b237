"""What isolation from hostile jobs costs: this tree against a baseline commit, in one run.

The same measurements as the checkpoint and restart sections (landed -> indexed of a
small entry; crash -> relaunch against the bare Popen loop), made by each tree's own code
in blocks that alternate, so whatever load the machine carries falls on both alike.

    .venv/bin/python tests/bench/bench_isolation.py [--base COMMIT] [--blocks 4] [--n 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests/bench")
import bench_checkpoint, bench_restart
n = int(sys.argv[1])
root = Path(tempfile.mkdtemp(prefix="trainsup-bench-iso-", dir="/var/tmp"))
(root / "land").mkdir(); (root / "pop").mkdir(); (root / "ts").mkdir()
out = {"landed": bench_checkpoint.daemon_landing(root / "land", n, 4096),
       "popen": bench_restart.popen_loop(root / "pop", n),
       "relaunch": bench_restart.trainsup(root / "ts", n)}
print("RESULT " + json.dumps(out))
"""


def tree_of(commit: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="trainsup-bench-base-"))
    arch = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=arch, check=True)
    (d / "trainsup").symlink_to("supervisor")      # `import trainsup` from this tree first
    return d


def probe(tree: Path, n: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, "-c", _PROBE, str(n)], cwd=tree, env=env, capture_output=True,
                       text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"probe in {tree} failed: {p.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="HEAD~1")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--n", type=int, default=10)
    a = ap.parse_args()
    base = tree_of(a.base)
    mine = REPO
    got: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    for b in range(a.blocks):
        for name, tree in (("base", base), ("this", mine)) if b % 2 == 0 else (("this", mine), ("base", base)):
            r = probe(tree, a.n)
            for k, v in r.items():
                got[name].setdefault(k, []).extend(v)
            print(f"block {b + 1}/{a.blocks} {name}: done", flush=True)

    def med(xs: list[float]) -> float:          # the probes report milliseconds
        return statistics.median(xs)

    def p95(xs: list[float]) -> float:
        return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.base], capture_output=True,
                         text=True).stdout.strip()
    rows = [
        ("landed -> indexed valid (4 KiB ckpt)", "landed", None),
        ("crash -> relaunch over the bare Popen loop", "relaunch", "popen"),
    ]
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"\n| measure | this tree (median / p95) | baseline {rev} (median / p95) | this - baseline (median) |")
    print("|---|---|---|---|")
    for what, k, floor in rows:
        t, bb = got["this"][k], got["base"][k]
        if floor is None:
            tm, bm = med(t), med(bb)
            print(f"| {what} | {tm:.2f} / {p95(t):.2f} ms (n={len(t)}) | {bm:.2f} / {p95(bb):.2f} ms "
                  f"(n={len(bb)}) | {tm - bm:+.2f} ms |")
        else:
            tf, bf = got["this"][floor], got["base"][floor]
            to, bo = med(t) - med(tf), med(bb) - med(bf)
            print(f"| {what} | +{to:.2f} ms ({med(t):.2f} vs Popen {med(tf):.2f}, n={len(t)}) | "
                  f"+{bo:.2f} ms ({med(bb):.2f} vs Popen {med(bf):.2f}, n={len(bb)}) | {to - bo:+.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
