"""The training helper (trainsup.training): the cost of ckpt.step() when no save is due,
emergency save (save signal -> committed checkpoint) vs torch.save + fsync of the same
state, and the training stall of an async save vs a synchronous one.

    .venv/bin/python tests/bench/run_all.py --only training [--quick]
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from measure import WORK_DIR, Section, Stat, workdir
from trainsup.training import Checkpointer


def busy_step(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def bench_step_cost(sec: Section, tmp: Path) -> None:
    model = torch.nn.Linear(4, 4)
    ck = Checkpointer(model=model, dir=tmp / "hot", every_steps=10**9, heartbeat_file=tmp / "hb")
    metrics = {"loss": 0.5}

    def empty(step: int, metrics=None) -> None:
        return None

    n = 200_000
    per_ck, per_empty = [], []
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                empty(i, metrics=metrics)
            per_empty.append((time.perf_counter() - t0) / n * 1e9)
            t0 = time.perf_counter()
            for i in range(1, n + 1):
                ck.step(i, metrics=metrics)
            per_ck.append((time.perf_counter() - t0) / n * 1e9)
    finally:
        ck.close()
    steps = 2000
    t0 = time.perf_counter()
    for _ in range(steps):
        busy_step(0.0002)
    step_ns = (time.perf_counter() - t0) / steps * 1e9
    ours = Stat("ns", per_ck)
    share = 100 * ours.median / step_ns
    sec.add("ckpt.step() with no save due (per call)", ours, "an empty Python call with the same args",
            Stat("ns", per_empty), target="< 1% of a 0.2 ms step", met=share < 1.0,
            note=f"{share:.3f}% of a {step_ns / 1e6:.2f} ms step")


def big_model(mib: int) -> torch.nn.Module:
    n_params = 8
    per = (mib << 20) // 4 // n_params
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per)) for _ in range(n_params)])


def plain_save(state: dict, path: Path) -> float:
    """The peer: what a careful user writes by hand, torch.save + fsync file and dir."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def signal_to_commit(model: torch.nn.Module, d: Path) -> float:
    """SIGUSR1 to this process -> the checkpoint committed at the next step boundary."""
    ck = Checkpointer(model=model, dir=d)
    try:
        i = 0
        t0 = time.perf_counter()
        os.kill(os.getpid(), signal.SIGUSR1)
        while ck.last_saved is None:
            i += 1
            ck.step(i)
            if i > 1000:
                raise RuntimeError(f"no checkpoint committed in {d} after the save signal")
        return time.perf_counter() - t0
    finally:
        ck.close()


def bench_emergency(sec: Section, tmp: Path, mib: int, reps: int) -> None:
    model = big_model(mib)
    ours, plain = [], []
    for _ in range(reps):
        # Interleaved, so both see whatever the disk is doing at the time.
        d = tmp / f"plain-{mib}"
        d.mkdir(exist_ok=True)
        plain.append(plain_save({"model": model.state_dict()}, d / "model.pt") * 1e3)
        shutil.rmtree(d)
        d = tmp / f"ours-{mib}"
        ours.append(signal_to_commit(model, d) * 1e3)
        shutil.rmtree(d)
    sec.add(f"emergency save {mib} MiB: signal -> committed", Stat("ms", ours), "torch.save + fsync, same state",
            Stat("ms", plain), latency=reps > 2)


def lost_training_time(ck: Checkpointer) -> float:
    """Training steps (matmuls, which release the GIL like real ones) through a save that
    step 5 starts; return the time spent inside ckpt.step at that step (the stall)."""
    a = torch.randn(384, 384)
    ck.every_steps = 5
    inside = 0.0
    for i in range(1, 6):
        (a @ a).sum()
        t1 = time.perf_counter()
        ck.step(i)
        if i == 5:
            inside = time.perf_counter() - t1
    while ck._inflight is not None and ck._inflight.is_alive():
        (a @ a).sum()
    ck.wait()
    assert ck.last_saved is not None, "the save did not commit"
    return inside


def bench_async(sec: Section, tmp: Path, mib: int, reps: int) -> None:
    model = big_model(mib)
    sync_s, async_s = [], []
    ck_async = Checkpointer(model=model, dir=tmp / f"async-{mib}", async_save=True, install_signals=False)
    ck_async.save(0, reason="manual")   # warms the snapshot buffers, as every later save finds them
    try:
        for _ in range(reps):
            ck = Checkpointer(model=model, dir=tmp / f"sync-{mib}", install_signals=False)
            sync_s.append(lost_training_time(ck) * 1e3)
            ck.close()
            shutil.rmtree(tmp / f"sync-{mib}")
            ck_async._committed_steps.clear()
            shutil.rmtree(tmp / f"async-{mib}" / "step-00000005", ignore_errors=True)
            async_s.append(lost_training_time(ck_async) * 1e3)
    finally:
        ck_async.close()
    ours, peer = Stat("ms", async_s), Stat("ms", sync_s)
    sec.add(f"async save {mib} MiB: training stall in step()", ours, "synchronous save stall", peer,
            target="<= 0.3x", met=ours.median <= 0.3 * peer.median)


def run(quick: bool = False) -> Section:
    sec = Section("training")
    torch.set_num_threads(1)
    with workdir("training", WORK_DIR) as tmp:
        bench_step_cost(sec, tmp)
        plan = [(16, 3)] if quick else [(16, 5), (256, 3), (1024, 2)]
        for mib, reps in plan:
            print(f"  emergency save {mib} MiB x{reps}...", flush=True)
            bench_emergency(sec, tmp, mib, reps)
        bench_async(sec, tmp, 16 if quick else 256, 2 if quick else 3)
    return sec


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    run("--quick" in sys.argv)
