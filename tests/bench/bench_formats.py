"""Validation throughput of a 1 GiB checkpoint of each framework format, cold cache, next to a
cold sequential read of the same bytes in the same run; and the cached re-check.

    .venv/bin/python tests/bench/bench_formats.py [--size-mib 1024] [--rounds 3] [--dir DIR]

Cold: `echo 3 > /proc/sys/vm/drop_caches` when permitted, else posix_fadvise(DONTNEED) on
every file (said in the output). Each round: drop, read every byte of the entry's files
(8 MiB reads), drop, validate through index.scan with no verdict cache. The cached re-check
is index.scan of the same dir with a warmed verdict cache (what runs before every launch).

The files are built here, byte-compatible with what each framework writes (pickle opcode
streams, a TF bundle with its SSTable index and CRC32Cs, an HDF5 v0 superblock, a torch
zip, safetensors): none of the frameworks is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import crc32c
from trainsup.checkpoint.formats.common import MemoryVerdictCache
from trainsup.checkpoint.formats.readers.hdf5 import SIGNATURE
from trainsup.checkpoint.index import scan

TENSOR = 16 << 20


def _payloads(total: int):
    """(index, bytes) chunks of TENSOR bytes summing to `total`; distinct, never all zero."""
    base = bytearray(os.urandom(min(TENSOR, total)))
    for i in range(max(1, total // len(base))):
        base[:8] = struct.pack("<Q", i)
        yield i, bytes(base)


# ---------------------------------------------------------------- writers

def _pickle_dict(path: Path, items) -> None:
    """A protocol-4 pickle of {key: bytes}: PROTO, EMPTY_DICT, MARK, (key, BINBYTES)*, SETITEMS, STOP."""
    with open(path, "wb") as f:
        f.write(b"\x80\x04}\x94(")
        for key, payload in items:
            k = key.encode()
            f.write(b"\x8c" + bytes([len(k)]) + k + b"\x94")
            f.write(b"B" + struct.pack("<I", len(payload)))
            f.write(payload)
            f.write(b"\x94")
        f.write(b"u.")


def write_paddle(d: Path, size: int) -> None:
    import pickle
    _pickle_dict(d / "iter_epoch_9.pdparams", ((f"linear_{i}.w_0", p) for i, p in _payloads(size)))
    _pickle_dict(d / "iter_epoch_9.pdopt", [("linear_0.w_0_beta1_pow_acc_0", struct.pack("<f", 0.9 ** 91))])
    (d / "iter_epoch_9.states").write_bytes(
        pickle.dumps({"best_model_dict": {}, "epoch": 9, "global_step": 90}, protocol=2))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wt: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wt) + payload


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    body += struct.pack("<II", 0, 1)          # one restart point at 0
    return body + b"\0" + struct.pack("<I", _mask(crc32c.crc32c(body + b"\0")))


def write_tf(d: Path, size: int, prefix: str = "ckpt-9", state: bool = True) -> None:
    entries = []
    off = 0
    with open(d / f"{prefix}.data-00000-of-00001", "wb") as f:
        for i, p in _payloads(size):
            f.write(p)
            shape = _field(2, 2, _varint(len(_field(1, 0, _varint(len(p) // 4))))
                           + _field(1, 0, _varint(len(p) // 4)))
            entry = (_field(1, 0, _varint(1)) + _field(2, 2, _varint(len(shape)) + shape)
                     + _field(4, 0, _varint(off)) + _field(5, 0, _varint(len(p)))
                     + _field(6, 5, struct.pack("<I", _mask(crc32c.crc32c(p)))))
            entries.append((f"model/layer_{i:04d}/kernel".encode(), entry))
            off += len(p)
    header = _field(1, 0, _varint(1))
    data_block = _block([(b"", header)] + sorted(entries))
    meta_block = _block([])
    index = data_block + meta_block
    handle = _varint(0) + _varint(len(data_block) - 5)
    index_block = _block([(max(entries)[0], handle)])
    footer = _varint(len(data_block)) + _varint(len(meta_block) - 5)
    footer += _varint(len(index)) + _varint(len(index_block) - 5)
    footer = footer.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    (d / f"{prefix}.index").write_bytes(index + index_block + footer)
    if state:
        (d / "checkpoint").write_text(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')


def write_keras(d: Path, size: int, name: str = "epoch09.weights.h5") -> None:
    sb = SIGNATURE + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + struct.pack("<HHI", 4, 16, 0)
    sb += struct.pack("<QQQQ", 0, 0xFFFFFFFFFFFFFFFF, size, 0xFFFFFFFFFFFFFFFF)
    with open(d / name, "wb") as f:
        f.write(sb.ljust(2048, b"\0"))
        left = size - 2048
        for _, p in _payloads(size):
            n = min(left, len(p))
            f.write(p[:n])
            left -= n
        f.write(b"\0" * left)


def write_lightning(d: Path, size: int) -> None:
    import pickle
    with zipfile.ZipFile(d / "epoch=8-step=90.ckpt", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"epoch": 8, "global_step": 90}, protocol=2))
        z.writestr("archive/byteorder", "little")
        for i, p in _payloads(size):
            z.writestr(f"archive/data/{i}", p)
        z.writestr("archive/version", "3\n")


def write_safetensors(d: Path, size: int) -> None:
    header, off, n = {}, 0, max(1, size // TENSOR)
    for i in range(n):
        header[f"layer.{i}.weight"] = {"dtype": "F32", "shape": [TENSOR // 4], "data_offsets": [off, off + TENSOR]}
        off += TENSOR
    h = json.dumps(header).encode()
    with open(d / "model-00090.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.writelines(p for _, p in _payloads(size))


WRITERS = {"paddle": write_paddle, "tf": write_tf, "keras": write_keras,
           "lightning": write_lightning, "safetensors": write_safetensors}


# ---------------------------------------------------------------- measuring

def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def drop_caches(d: Path) -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in _files(d):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise(DONTNEED)"


def cold_read(d: Path) -> float:
    buf = bytearray(8 << 20)
    t = time.perf_counter()
    for p in _files(d):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def validate(d: Path, fmt: str) -> float:
    t = time.perf_counter()
    infos = scan(d, fmt)
    dt = time.perf_counter() - t
    if len(infos) != 1 or not infos[0].valid:
        raise SystemExit(f"{fmt}: expected one valid entry, got {[(i.name, i.invalid_reason) for i in infos]}")
    return dt


def cached_recheck(d: Path, fmt: str, n: int = 30) -> float:
    cache = MemoryVerdictCache()
    scan(d, fmt, cache)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        infos = scan(d, fmt, cache)
        times.append(time.perf_counter() - t)
        assert infos[0].cached
    return statistics.median(times)


# ---------------------------------------------------------------- completion inside an entry

def _complete_hf(ck: Path, n: int) -> float:
    d = ck / f"checkpoint-{n}"
    d.mkdir()
    (d / "config.json").write_text("{}")
    h = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
    t = time.time()
    (d / "trainer_state.json").write_text(json.dumps({"global_step": n}))   # Trainer writes it last
    return t


def _complete_tf(ck: Path, n: int) -> float:
    write_tf(ck, 1 << 16, prefix=f"ckpt-{n}", state=False)
    listed = sorted(int(p.name[5:-6]) for p in ck.glob("ckpt-*.index"))
    text = f'model_checkpoint_path: "ckpt-{n}"\n' + "".join(f'all_model_checkpoint_paths: "ckpt-{k}"\n' for k in listed)
    (ck / "checkpoint.tmp").write_text(text)
    t = time.time()
    os.rename(ck / "checkpoint.tmp", ck / "checkpoint")         # CheckpointManager's commit
    return t


def _complete_keras(ck: Path, n: int) -> float:
    b = ck / "backup"
    b.mkdir(exist_ok=True)
    write_keras(b, 1 << 16, name="latest.weights.h5")
    t = time.time()
    (b / "training_metadata.json").write_text(json.dumps({"epoch": n, "batch": 0}))  # BackupAndRestore's marker
    return t


def _complete_trainsup(ck: Path, n: int) -> float:
    """The peer in the same run: trainsup's own atomic landing (a rename of a whole dir)."""
    from trainsup.checkpoint import format as ckfmt
    from trainsup.checkpoint import write_checkpoint
    landed: list[float] = []
    ckfmt.phase_hook = lambda phase: landed.append(time.time()) if phase == "renamed" else None
    try:
        write_checkpoint(ck, n, {"state.bin": b"\0" * 4096})
    finally:
        ckfmt.phase_hook = None
    return landed[0]


COMPLETERS = {"hf": _complete_hf, "tf": _complete_tf, "keras": _complete_keras, "trainsup": _complete_trainsup}


def completion_latency(top: Path, fmt: str, n: int) -> list[float]:
    """Commit write inside an entry -> the daemon's `checkpoint` event for it, in ms."""
    from measure import poll, running_daemon
    ck = top / f"ck-{fmt}"
    ck.mkdir()
    lat = []
    with running_daemon(top / f"daemon-{fmt}") as d:
        d.write_job("c", f"name: c\ncommand: [sleep, '3600']\nworkdir: {top}\n"
                         f"checkpoint:\n  dir: {ck}\n  keep_last: 100000\n")
        d.start()
        d.wait_state("c", "running")
        for i in range(n):
            step = 10 + i
            t = COMPLETERS[fmt](ck, step)
            ev = poll(lambda step=step: next((e for e in d.history("c", 20) if e["kind"] == "checkpoint"
                                              and e.get("step") == step), None), 30, f"{fmt} step {step} indexed")
            lat.append((ev["at"] - t) * 1e3)
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the checkpoints (default: a temp dir)")
    ap.add_argument("--only", nargs="*", default=sorted(WRITERS))
    ap.add_argument("--completions", type=int, default=20,
                    help="saves completed inside an entry per format under a real daemon (0: skip)")
    a = ap.parse_args()
    size = a.size_mib << 20
    top = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=a.dir))
    rows = []
    try:
        for fmt in a.only:
            d = top / fmt
            d.mkdir()
            WRITERS[fmt](d, size)
            nbytes = sum(p.stat().st_size for p in _files(d))
            reads, vals = [], []
            for _ in range(a.rounds):
                how = drop_caches(d)
                reads.append(cold_read(d))
                drop_caches(d)
                vals.append(validate(d, fmt))
            read_s, val_s = statistics.median(reads), statistics.median(vals)
            cached = cached_recheck(d, fmt)
            rows.append((fmt, nbytes, read_s, val_s, cached, how))
            shutil.rmtree(d)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"{'format':12} {'bytes':>13} {'cold read MB/s':>15} {'validate MB/s':>14} {'ratio':>7} "
          f"{'target':>7} {'cached re-check':>16} {'target':>7}  cold via")
    ok = True
    for fmt, nbytes, read_s, val_s, cached, how in rows:
        ratio = read_s / val_s
        ok &= ratio >= 0.8 and cached <= 0.005
        print(f"{fmt:12} {nbytes:13,} {nbytes / read_s / 1e6:15.0f} {nbytes / val_s / 1e6:14.0f} "
              f"{ratio:6.0%} {'>=80%':>7} {cached * 1e3:13.2f} ms {'<=5 ms':>7}  {how}")
    if a.completions:
        top = Path(tempfile.mkdtemp(prefix="bench-formats-", dir=a.dir))
        try:
            print(f"\n{'completion inside an entry -> indexed valid':46} {'median':>9} {'p95':>9} {'target':>8}")
            for fmt in COMPLETERS:
                lat = sorted(completion_latency(top, fmt, a.completions))
                med, p95 = statistics.median(lat), lat[min(len(lat) - 1, int(0.95 * len(lat)))]
                target = "<=10 ms" if fmt != "trainsup" else "peer"
                ok &= med <= 10.0 or fmt == "trainsup"
                print(f"{fmt:46} {med:6.1f} ms {p95:6.1f} ms {target:>8}")
        finally:
            shutil.rmtree(top, ignore_errors=True)
    print("medians of", a.rounds, "rounds each;", "all targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
