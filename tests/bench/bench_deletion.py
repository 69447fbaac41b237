"""Safe deletion (issue 11): the rotation decision over 10,000 checkpoints with every
protection in play, the pre-launch re-proof of a 1 GiB verified checkpoint (stat-only on
ext4; a re-hash on tmpfs, against a plain read of the same file), and `status` round
trips while the daemon deletes a 10 GiB checkpoint (sparse, plus 20,000 small files so
the deletion takes real time).

    .venv/bin/python tests/bench/run_all.py --only deletion [--quick]
    .venv/bin/python tests/bench/bench_deletion.py [--quick]      # prints the table alone
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import WORK_DIR, Section, Stat, job_yaml, poll, running_daemon, workdir  # noqa: E402
from trainsup.checkpoint import MemoryVerdictCache, write_checkpoint  # noqa: E402
from trainsup.checkpoint.custody import JobCheckpointDir  # noqa: E402
from trainsup.checkpoint.dirhandle import DirHandle  # noqa: E402
from trainsup.checkpoint.index import CheckpointInfo  # noqa: E402
from trainsup.checkpoint.reprove import fs_magic, reprove  # noqa: E402
from trainsup.control.client import request  # noqa: E402
from trainsup.spec import CheckpointSpec  # noqa: E402

FAKEJOB = Path(__file__).resolve().parents[1] / "helpers" / "fakejob.py"


def _infos(n: int) -> list[CheckpointInfo]:
    d = Path("/ck")
    out = []
    for s in range(1, n + 1):
        name = f"step-{s:08d}"
        out.append(CheckpointInfo(path=d / name, name=name, format="trainsup", step=s, bytes=1000,
                                  valid=s % 997 != 0, invalid_reason=None if s % 997 else "broken",
                                  metrics={"val_loss": (s * 7919) % 1000 / 1000}, mtime=1e6 + s,
                                  fp=f"fp{s}", ino=s))
    return out


def rotation_decision(sec: Section) -> None:
    infos = _infos(10_000)
    spec = CheckpointSpec(dir=Path("/ck"), keep_last=5, keep_best=3, metric="val_loss", keep_every=1000,
                          quota=50_000)
    jd = JobCheckpointDir("bench", spec, 0.0, None)
    jd.handle = DirHandle.open("/tmp")       # held (the plan itself does no I/O)
    jd.observe(infos)
    jd.liveness.clock = (lambda t0=time.monotonic(): lambda: t0 + 3600)()     # all quiet
    jd.inventory = {"entries": {f"step-{s:08d}": s for s in range(1, 50)}}
    pins = {7, 70, 700}
    samples = []
    for _ in range(7):
        t = time.perf_counter()
        plan = jd.plan(infos, pinned=pins)
        samples.append((time.perf_counter() - t) * 1000)
    assert plan.delete
    jd.close()
    ms = min(samples)
    sec.add("rotation decision, 10,000 checkpoints (liveness, inventory, protections, quota)",
            Stat(samples=samples, unit="ms"), target="<= 100 ms", met=ms <= 100, latency=True)


def _plain_read(path: Path) -> float:
    buf = bytearray(8 << 20)
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        f = os.fdopen(fd, "rb", buffering=0)
        while f.readinto(buf):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t


def _cold(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def reproof(sec: Section, size: int) -> None:
    gib = size / (1 << 30)
    # ext4 (or whatever WORK_DIR is on): stamps mapped writes, so the verdict is re-proven
    # from the lstat fingerprint once verified (after settle).
    with workdir("reproof", WORK_DIR) as root:
        ck = root / "ck"
        write_checkpoint(ck, 1, {"model.bin": lambda p: _random_file(p, size)})
        cache = MemoryVerdictCache()
        with DirHandle.open(ck) as h:
            io = f"{h.io_root}/step-00000001"
            assert reprove(io, "trainsup", cache, str(ck / "step-00000001")).valid     # verified once
            samples = []
            for _ in range(20):
                t = time.perf_counter()
                v = reprove(io, "trainsup", cache, str(ck / "step-00000001"))
                samples.append((time.perf_counter() - t) * 1000)
                assert v.valid
        fs = hex(fs_magic(str(ck)))
        sec.add(f"pre-launch re-proof, {gib:g} GiB verified checkpoint (fs {fs}: fingerprint)",
                Stat(samples=samples, unit="ms"), target="<= 5 ms", met=min(samples) <= 5, latency=True)
    # tmpfs: mapped writes never move ctime, so the re-proof re-hashes: vs a plain read.
    tmpfs = Path("/dev/shm")
    with workdir("reproof-shm", str(tmpfs)) as root:
        ck = root / "ck"
        write_checkpoint(ck, 1, {"model.bin": lambda p: _random_file(p, size)})
        cache = MemoryVerdictCache()
        f = ck / "step-00000001" / "model.bin"
        with DirHandle.open(ck) as h:
            io = f"{h.io_root}/step-00000001"
            reprove(io, "trainsup", cache, str(ck / "step-00000001"))
            ours, peer = [], []
            for _ in range(3):
                t = time.perf_counter()
                assert reprove(io, "trainsup", cache, str(ck / "step-00000001")).valid
                ours.append(gib / (time.perf_counter() - t))
                peer.append(gib / _plain_read(f))
        ratio = Stat(samples=ours, unit="").median / Stat(samples=peer, unit="").median
        sec.add(f"pre-launch re-proof on tmpfs, {gib:g} GiB (re-hash)", Stat(samples=ours, unit="GiB/s"),
                "plain read of the same file", Stat(samples=peer, unit="GiB/s"),
                target=">= 0.8x of a read", met=ratio >= 0.8)


def _random_file(p: Path, size: int) -> None:
    chunk = os.urandom(8 << 20)
    with open(p, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def status_during_delete(sec: Section, small_files: int) -> None:
    with workdir("del", WORK_DIR) as root, running_daemon(root) as d:
        ck = root / "big-ckpt"
        cmd = [sys.executable, str(FAKEJOB), "--record", str(root / "big.rec"), "--every", "2"]
        d.write_job("big", job_yaml("big", cmd, workdir=root, ckpt_dir=ck,
                                    extra="  keep_best: 0\nemergency_save:\n  grace: 0s\n"))
        d.start()
        d.wait_ready("big")
        poll(lambda: any(p.name.startswith("step-") for p in ck.iterdir()), 20, "a first checkpoint")
        stage = root / "stage" / "step-00000000"          # built outside, moved in whole
        (stage / "shards").mkdir(parents=True)
        with open(stage / "model.bin", "wb") as f:
            f.truncate(10 << 30)                           # 10 GiB (sparse)
        for i in range(small_files):
            (stage / "shards" / f"s{i:06d}").write_bytes(b"x")
        os.rename(stage, ck / "step-00000000")             # no manifest: invalid, oldest
        # from the moment it lands (scanned: 20k lstat calls, planned once quiet, moved to
        # the trash, emptied) until it is gone: status must answer throughout
        rtts = []
        gone = lambda: not (ck / "step-00000000").exists() and not any((ck / ".trainsup-trash").iterdir())  # noqa: E731
        t0 = time.monotonic()
        while not gone() and time.monotonic() < t0 + 120:
            t = time.perf_counter()
            r = request(d.socket, "status", None, None, timeout=10)
            rtts.append((time.perf_counter() - t) * 1000)
            assert r["ok"]
            time.sleep(0.005)
        assert gone(), "the 10 GiB checkpoint was not deleted"
        st = Stat(samples=rtts, unit="ms")
        sec.add(f"status round trip from a 10 GiB checkpoint ({small_files} files) landing to its "
                f"deletion done ({time.monotonic() - t0:.1f}s)", st,
                target="<= 20 ms (p95)", met=st.p95 <= 20, latency=True, note=f"max {max(rtts):.1f} ms")
        poll(lambda: any(e["kind"] == "deleted" and e.get("path", "").endswith("step-00000000")
                         for e in request(d.socket, "history", "big", {"n": 1000})["result"]), 10, "deleted")
        hist = request(d.socket, "history", "big", {"n": 1000})["result"]
        kinds = [e["kind"] for e in sorted(hist, key=lambda e: e["at"])
                 if e.get("path", "").endswith("step-00000000") and e["kind"].startswith("delete")]
        sec.notes.append(f"history of the big entry: {kinds}")


def run(quick: bool = False) -> Section:
    sec = Section("deletion")
    t = time.monotonic()
    rotation_decision(sec)
    reproof(sec, (256 << 20) if quick else (1 << 30))
    status_during_delete(sec, 5_000 if quick else 20_000)
    sec.seconds = time.monotonic() - t
    return sec


if __name__ == "__main__":
    import report
    s = run(quick="--quick" in sys.argv)
    print()
    print(report.table(s.rows))
    for n in s.notes:
        print(n)
