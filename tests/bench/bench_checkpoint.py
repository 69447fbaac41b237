"""Checkpoint store numbers: validation throughput vs a cold read, cached verify, rotation
over 10k, landing -> on_change latency. Throwaway measurement; prints a table.

    .venv/bin/python tests/bench/bench_checkpoint.py [--gib 1] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from supervisor.checkpoint import write_checkpoint  # noqa: E402
from supervisor.checkpoint.index import CheckpointInfo  # noqa: E402
from supervisor.checkpoint.rotation import plan_rotation  # noqa: E402
from supervisor.checkpoint.validate import MemoryVerdictCache, check_entry  # noqa: E402
from supervisor.checkpoint.watch import CheckpointWatcher, ObserverHub  # noqa: E402
from supervisor.spec import CheckpointSpec  # noqa: E402


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cold_read(path: Path) -> float:
    buf = bytearray(128 << 10)  # cat's buffer size
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="trainsup-bench-", dir=a.dir))
    try:
        size = int(a.gib * (1 << 30))
        chunk = os.urandom(8 << 20)

        def writer(p: Path) -> None:
            with open(p, "wb") as f:
                left = size
                while left:
                    n = min(left, len(chunk))
                    f.write(chunk[:n])
                    left -= n

        ck = write_checkpoint(work, 1, {"state.bin": writer})
        gib = size / (1 << 30)
        dropped = drop_caches()
        t_cat = cold_read(ck / "state.bin")
        drop_caches()
        t = time.perf_counter()
        v = check_entry(str(ck), "trainsup").verdict
        t_val = time.perf_counter() - t
        assert v.valid, v
        note = "" if dropped else " (page cache NOT dropped: not permitted)"
        rows.append((f"cold read, 128 KiB buffers{note}", f"{gib / t_cat:.2f} GiB/s", f"{t_cat:.2f} s"))
        rows.append(("validate (xxh3_128), cold", f"{gib / t_val:.2f} GiB/s",
                     f"{100 * t_cat / t_val:.0f}% of cold read"))
        t = time.perf_counter()
        check_entry(str(ck), "trainsup")
        t_warm = time.perf_counter() - t
        rows.append(("validate, warm page cache", f"{gib / t_warm:.2f} GiB/s", ""))
        cache = MemoryVerdictCache()
        check_entry(str(ck), "trainsup", cache)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            c = check_entry(str(ck), "trainsup", cache)
            times.append(time.perf_counter() - t)
            assert c.cached
        rows.append(("cached verify of that checkpoint", f"{statistics.median(times) * 1e3:.3f} ms median",
                     f"max {max(times) * 1e3:.3f} ms"))

        infos = [CheckpointInfo(path=Path(f"/c/step-{s:08d}"), name=f"step-{s:08d}", format="trainsup",
                                step=s, bytes=1000, valid=s % 97 != 0, metrics={"val_loss": (s * 7919) % 1000},
                                mtime=float(s)) for s in range(1, 10_001)]
        spec = CheckpointSpec(dir=Path("/c"), keep_last=5, keep_best=3, metric="val_loss", keep_every=1000,
                              quota=100_000)
        rt = []
        for _ in range(5):
            t = time.perf_counter()
            plan_rotation(infos, spec, now=20_000.0)
            rt.append(time.perf_counter() - t)
        rows.append(("rotation decision, 10,000 checkpoints", f"{min(rt) * 1e3:.1f} ms best",
                     f"median {statistics.median(rt) * 1e3:.1f} ms"))

        lat, indexed = landing_latency(work / "watched")
        rows.append(("landing (rename) -> on_change", f"{statistics.median(lat) * 1e3:.3f} ms median",
                     f"p90 {sorted(lat)[int(len(lat) * 0.9)] * 1e3:.3f} ms, n={len(lat)}"))
        rows.append(("landing -> indexed valid (small ckpt)", f"{statistics.median(indexed) * 1e3:.3f} ms median",
                     f"p90 {sorted(indexed)[int(len(indexed) * 0.9)] * 1e3:.3f} ms"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>22}  {r[2]}")


def landing_latency(ck: Path, n: int = 50) -> tuple[list[float], list[float]]:
    ck.mkdir()
    hub = ObserverHub()
    got = threading.Event()
    seen = {}

    def on_change(reason: str) -> None:
        seen.setdefault("t", time.perf_counter())
        got.set()

    w = CheckpointWatcher(ck, on_change, hub=hub)
    w.start()
    lat, indexed = [], []
    try:
        for i in range(n):
            # prepared like the writer does (tmp dir, manifest), then only the rename is timed
            stage = ck / ".trainsup-tmp"
            p = write_checkpoint(stage, i, {"x": b"1" * 4096})
            time.sleep(0.02)  # let events of the staging settle; not a stand-in for a condition
            got.clear()
            seen.clear()
            t0 = time.perf_counter()
            os.rename(p, ck / p.name)
            if not got.wait(2):
                raise RuntimeError("on_change never came")
            lat.append(seen["t"] - t0)
            assert check_entry(str(ck / p.name), "trainsup").verdict.valid
            indexed.append(time.perf_counter() - t0)
    finally:
        w.stop()
        hub.stop()
    return lat, indexed


if __name__ == "__main__":
    main()
