"""The checkpoint store: landed -> indexed valid under a real daemon (vs the bare inotify
event), validation throughput vs a cold read of the same file, xxh3 vs memory bandwidth,
the cached verdict vs plain stat, and the rotation decision over 10,000 checkpoints.

    .venv/bin/python tests/bench/run_all.py --only checkpoint [--quick]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import xxhash
from measure import WORK_DIR, Section, Stat, job_yaml, poll, running_daemon, workdir
from trainsup.checkpoint import format as ckfmt
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.formats.common import MemoryVerdictCache
from trainsup.checkpoint.index import CheckpointInfo
from trainsup.checkpoint.rotation import plan_rotation
from trainsup.checkpoint.validate import check_entry
from trainsup.spec import CheckpointSpec


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cold_read(path: Path) -> float:
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def write_random(path: Path, size: int) -> None:
    chunk = os.urandom(8 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def landed_times(ck_dir: Path, n: int, payload: int) -> list[float]:
    """Commit `n` checkpoints; return the wall time of each rename (the moment it lands)."""
    landed: list[float] = []

    def hook(phase: str) -> None:
        if phase == "renamed":
            landed.append(time.time())

    ckfmt.phase_hook = hook
    data = os.urandom(payload)
    try:
        for i in range(n):
            before = len(landed)
            write_checkpoint(ck_dir, 1000 + i, {"state.bin": data}, reason="periodic")
            assert len(landed) == before + 1
            yield landed[-1]
    finally:
        ckfmt.phase_hook = None


def daemon_landing(root: Path, n: int, payload: int) -> list[float]:
    """Landed (rename) -> the daemon's `checkpoint` event (indexed valid), in ms."""
    ck = root / "ck"
    with running_daemon(root / "daemon") as d:
        d.write_job("idx", job_yaml("idx", ["sleep", "3600"], workdir=root, ckpt_dir=ck))
        d.start()
        d.wait_state("idx", "running")
        lat = []
        for i, t_land in enumerate(landed_times(ck, n, payload)):
            step = 1000 + i
            ev = poll(lambda: next((e for e in d.history("idx", 50) if e["kind"] == "checkpoint"
                                    and e.get("step") == step), None), 30, f"checkpoint event for step {step}")
            lat.append((ev["at"] - t_land) * 1e3)
    return lat


def inotify_landing(root: Path, n: int) -> list[float]:
    """Landed -> the watcher's callback, with no daemon: the event-delivery floor, in ms."""
    from trainsup.checkpoint.watch import CheckpointWatcher, ObserverHub
    ck = root / "ck-bare"
    ck.mkdir()
    hub = ObserverHub()
    got = threading.Event()
    seen: dict[str, float] = {}

    def on_change(reason: str) -> None:
        seen.setdefault("t", time.time())
        got.set()

    w = CheckpointWatcher(ck, on_change, hub=hub)
    w.start()
    lat = []
    try:
        stage = root / "stage"
        for i in range(n):
            p = write_checkpoint(stage, i, {"x": b"1" * 4096})
            got.clear()
            seen.clear()
            t0 = time.time()
            os.rename(p, ck / p.name)
            if not got.wait(5):
                raise RuntimeError("the watcher never reported the rename")
            lat.append((seen["t"] - t0) * 1e3)
    finally:
        w.stop()
        hub.stop()
    return lat


def bench_throughput(sec: Section, root: Path, gib: float) -> None:
    size = int(gib * (1 << 30))
    ck = write_checkpoint(root / "big", 1, {"state.bin": lambda p: write_random(p, size)})
    label = f"{gib:g} GiB"
    dropped = drop_caches()
    t_read = cold_read(ck / "state.bin")
    drop_caches()
    t = time.perf_counter()
    v = check_entry(str(ck), "trainsup").verdict
    t_val = time.perf_counter() - t
    assert v.valid, v
    gibs = lambda s: size / (1 << 30) / s  # noqa: E731
    note = "" if dropped else "page cache could not be dropped (not root)"
    sec.add(f"validate {label} (xxh3_128), cold cache", Stat.one(gibs(t_val), "GiB/s"),
            "cold sequential read of the same file", Stat.one(gibs(t_read), "GiB/s"), note=note)
    reps = [None] * 3
    for i in range(3):
        t = time.perf_counter()
        check_entry(str(ck), "trainsup")
        reps[i] = gibs(time.perf_counter() - t)
    # xxh3 alone over an in-memory buffer: the most validation could do once data is read.
    buf = os.urandom(256 << 20)
    dst = bytearray(len(buf))   # touched once, so the copy below is not page faults
    dst[:] = buf
    hs, cp = [], []
    for _ in range(3):
        t = time.perf_counter()
        xxhash.xxh3_128(buf).hexdigest()
        hs.append(0.25 / (time.perf_counter() - t))
        t = time.perf_counter()
        memoryview(dst)[:] = buf     # a plain memcpy; bytearray slice assignment is 8x slower
        cp.append(0.25 / (time.perf_counter() - t))
    sec.add(f"validate {label}, warm page cache", Stat("GiB/s", reps), "xxh3_128 over RAM (hash limit)",
            Stat("GiB/s", hs))
    sec.add("xxh3_128 over RAM", Stat("GiB/s", hs), "memory copy (bandwidth limit)", Stat("GiB/s", cp))
    cache = MemoryVerdictCache()
    check_entry(str(ck), "trainsup", cache)
    cached, stats = [], []
    for _ in range(50):
        t = time.perf_counter()
        c = check_entry(str(ck), "trainsup", cache)
        cached.append((time.perf_counter() - t) * 1e3)
        assert c.cached
        t = time.perf_counter()
        os.stat(ck / "MANIFEST.json")
        os.stat(ck / "state.bin")
        stats.append((time.perf_counter() - t) * 1e3)
    sec.add("cached verdict (resume path)", Stat("ms", cached), "2 x os.stat (manifest + file)", Stat("ms", stats),
            latency=True)


def bench_rotation(sec: Section) -> None:
    infos = [CheckpointInfo(path=Path(f"/c/step-{s:08d}"), name=f"step-{s:08d}", format="trainsup",
                            step=s, bytes=1000, valid=s % 97 != 0, metrics={"val_loss": (s * 7919) % 1000},
                            mtime=float(s)) for s in range(1, 10_001)]
    spec = CheckpointSpec(dir=Path("/c"), keep_last=5, keep_best=3, metric="val_loss", keep_every=1000,
                          quota=100_000)
    rot, srt = [], []
    for _ in range(5):
        t = time.perf_counter()
        plan_rotation(infos, spec, now=20_000.0)
        rot.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        sorted(infos, key=lambda i: (i.step, i.mtime))
        sorted(infos, key=lambda i: i.metrics["val_loss"])
        srt.append((time.perf_counter() - t) * 1e3)
    sec.add("rotation decision, 10,000 checkpoints", Stat("ms", rot), "two sorts of the 10,000 (by step, by metric)",
            Stat("ms", srt), latency=True)


def run(quick: bool = False) -> Section:
    sec = Section("checkpoint")
    n = 5 if quick else 30
    with workdir("ckpt", WORK_DIR) as root:
        print("  landing latency...", flush=True)
        floor = inotify_landing(root, n)
        small = daemon_landing(root / "small", n, 4096)
        sec.add("landed -> indexed valid by the daemon (4 KiB ckpt)", Stat("ms", small),
                "landed -> inotify callback (watcher alone)", Stat("ms", floor), compare="delta", latency=True)
        big_n = 2 if quick else 3
        big = daemon_landing(root / "big", big_n, 256 << 20)
        sec.add("landed -> indexed valid by the daemon (256 MiB ckpt)", Stat("ms", big),
                "landed -> inotify callback (watcher alone)", Stat("ms", floor), compare="delta", latency=True,
                note="includes hashing the 256 MiB once")
        print("  validation throughput...", flush=True)
        bench_throughput(sec, root, 0.25 if quick else 1.0)
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run("--quick" in sys.argv)
