"""A job's files as hostile input to the readers every job shares: each finding reproduced
the way it was found (real FIFOs, sparse files, a zip bomb, a deep tree, huge numbers),
at the level of the reader that met it. The daemon-level versions are in
tests/faults/test_hostile_files.py and tests/faults/test_hostile_neighbour.py."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.format import ManifestError, parse_manifest
from trainsup.checkpoint.formats import protected_steps
from trainsup.checkpoint.formats.common import Verdict
from trainsup.checkpoint.formats.tf import before_delete as tf_before_delete
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.jobfile import Invalid, open_file, read_capped
from trainsup.checkpoint.validate import check_entry

# A reader that waits on a FIFO waits for ever; the test gives it this long, then says so.
DEADLINE_S = 20.0


def returns_within(fn: Callable[[], Any], seconds: float = DEADLINE_S, release: Callable[[], None] | None = None) -> Any:
    """fn() run on a helper thread; AssertionError when it has not returned in time
    (then `release` unblocks it, so that a regression fails the test, not the run)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:      # handed back to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if release is not None:
            release()
        raise AssertionError(f"{getattr(fn, '__name__', fn)} still running after {seconds} s (waiting on a job's file)")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def open_fifo_writers(*fifos: Path) -> Callable[[], None]:
    def release() -> None:
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    return release


def _hf_entry(d: Path, step: int, state: dict | None = None) -> Path:
    e = d / f"checkpoint-{step}"
    e.mkdir(parents=True)
    (e / "trainer_state.json").write_text(json.dumps(state or {"global_step": step}))
    return e


class _Info:
    def __init__(self, name: str, step: int):
        self.name, self.step, self.format, self.valid = name, step, "hf", True


# ---------------------------------------------------------------- FIFOs

def test_hf_trainer_state_json_swapped_for_a_fifo_is_not_waited_on(tmp_path):
    """Found: rotation's read of HF's best step opened trainer_state.json blocking (on the
    event loop): a FIFO swapped in for it froze the daemon for ever."""
    _hf_entry(tmp_path, 2)
    e = tmp_path / "checkpoint-4"
    e.mkdir()
    os.mkfifo(e / "trainer_state.json")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = returns_within(lambda: protected_steps(fd, [_Info("checkpoint-2", 2), _Info("checkpoint-4", 4)]),
                             release=open_fifo_writers(e / "trainer_state.json"))
    finally:
        os.close(fd)
    assert got == set()     # nothing read, nothing guessed
    # and the entry's own verdict says why
    v = returns_within(lambda: check_entry(str(e), "hf").verdict, release=open_fifo_writers(e / "trainer_state.json"))
    assert not v.valid and "not a regular file" in (v.invalid_reason or "")


def test_tf_checkpoint_state_fifo_and_planted_temp_fifo_during_deletion_are_not_waited_on(tmp_path):
    """Found: deleting an invalid TF entry rewrote TF's `checkpoint` state file first,
    reading a FIFO of that name and writing a planted `checkpoint.tmp<pid>` FIFO, both
    blocking, inside the daemon-wide rotation pass."""
    os.mkfifo(tmp_path / "checkpoint")
    os.mkfifo(tmp_path / f"checkpoint.tmp{os.getpid():x}")
    (tmp_path / "ckpt-1.index").write_bytes(b"junk")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        returns_within(lambda: tf_before_delete(fd, "ckpt-1"),
                       release=open_fifo_writers(tmp_path / "checkpoint", tmp_path / f"checkpoint.tmp{os.getpid():x}"))
    finally:
        os.close(fd)
    # the job's FIFO is left as it was: not TF's state file, not the daemon's to touch
    assert (tmp_path / "checkpoint").is_fifo()


def test_tf_state_rewrite_never_writes_into_a_planted_temp_fifo(tmp_path):
    """A real state file, and a FIFO planted under the rewrite's temp name: the rewrite
    creates its own temp file and the state file loses the deleted entry."""
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n'
                                         'all_model_checkpoint_paths: "ckpt-1"\n'
                                         'all_model_checkpoint_paths: "ckpt-2"\n')
    tmp = tmp_path / f"checkpoint.tmp{os.getpid():x}"
    os.mkfifo(tmp)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        returns_within(lambda: tf_before_delete(fd, "ckpt-1"), release=open_fifo_writers(tmp))
    finally:
        os.close(fd)
    assert "ckpt-1" not in (tmp_path / "checkpoint").read_text()
    assert not tmp.exists()


@pytest.mark.parametrize("kind", ["fifo", "socket", "symlink-loop"])
def test_every_small_file_reader_refuses_what_is_not_a_regular_file(tmp_path, kind):
    import socket
    p = tmp_path / "MANIFEST.json"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
    else:
        os.symlink("MANIFEST.json", p)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Invalid):
            returns_within(lambda: read_capped(fd, "MANIFEST.json", "manifest"), release=open_fifo_writers(p))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- budgets

def _trainsup_entry_listing(tmp_path: Path, step: int, name: str, size: int, digest: str) -> Path:
    e = tmp_path / f"step-{step:08d}"
    write_checkpoint(tmp_path, step, {"small.bin": b"x" * 10})
    m = json.loads((e / "MANIFEST.json").read_text())
    m["files"][name] = {"size": size, "xxh3_128": digest}
    (e / "MANIFEST.json").write_text(json.dumps(m))
    return e


def test_sparse_4tib_file_listed_by_a_manifest_with_a_wrong_hash_is_not_hashed(tmp_path):
    """Found: two manifests listing a 4 TiB sparse file with a wrong hash kept both pool
    threads hashing zeros; the verdict now costs what the file holds."""
    size = 4 << 40
    e = _trainsup_entry_listing(tmp_path, 7, "huge.bin", size, "0" * 32)
    with open(e / "huge.bin", "wb") as f:
        f.truncate(size)
    t = time.monotonic()
    v = returns_within(lambda: check_entry(str(e), "trainsup").verdict, 60)
    took = time.monotonic() - t
    assert not v.valid and "sparse" in (v.invalid_reason or ""), v
    assert took < 30, f"{took:.1f}s for a verdict on a file of no blocks"


def test_read_budget_counts_what_a_file_really_holds(tmp_path):
    (tmp_path / "dense").write_bytes(b"a" * 4096)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        f, st = open_file(fd, "dense")
        os.close(f)
        assert st.st_size == 4096
    finally:
        os.close(fd)


def _overlapping_zip(members: int, inflated: int) -> bytes:
    """One deflated member of `inflated` zeros, and `members` central-directory entries
    all pointing at it (the 226 KB bomb named ckpt-1.pt)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * inflated)
    raw = buf.getvalue()
    eocd = raw.rfind(b"PK\x05\x06")
    cd_off = struct.unpack_from("<I", raw, eocd + 16)[0]
    cd = raw[cd_off:eocd]
    name_len = struct.unpack_from("<H", cd, 28)[0]
    fixed, name = cd[:46], cd[46:46 + name_len]
    entries = [cd] + [fixed[:28] + struct.pack("<H", len(n)) + fixed[30:] + n
                      for n in (f"archive/x{i:05d}".encode() for i in range(members - 1))]
    body = b"".join(entries)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, members, members, len(body), cd_off, 0)
    assert name == b"archive/data.pkl"
    return raw[:cd_off] + body + end


def test_overlapping_zip_named_ckpt_pt_is_refused_before_inflating(tmp_path):
    """Found: 2000 central entries pointing at one 100 MiB-of-zeros member kept a pool
    thread inflating for minutes; refused now before a byte is inflated."""
    d = tmp_path / "ck"
    d.mkdir()
    bomb = _overlapping_zip(2000, 100 << 20)
    assert len(bomb) < 400_000
    (d / "ckpt-1.pt").write_bytes(bomb)
    t = time.monotonic()
    v = returns_within(lambda: check_entry(str(d / "ckpt-1.pt"), "torch").verdict, 60)
    assert time.monotonic() - t < 5
    assert not v.valid and ("overlaps" in (v.invalid_reason or "") or "twice" in (v.invalid_reason or "")), v


def test_a_single_deflated_member_still_validates(tmp_path):
    """The refusal is of overlap, not of compression: an honest deflated zip passes."""
    d = tmp_path / "ck"
    d.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": list(range(1000))}))
        z.writestr("archive/version", "3\n")
    (d / "ckpt-1.pt").write_bytes(buf.getvalue())
    assert check_entry(str(d / "ckpt-1.pt"), "torch").verdict.valid


def test_deflate_ratio_past_what_deflate_can_give_is_a_bomb(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (1 << 20))
    raw = bytearray(buf.getvalue())
    # the central entry claims 4 GiB uncompressed from about 1 KiB
    eocd = raw.rfind(b"PK\x05\x06")
    cd_off = struct.unpack_from("<I", raw, eocd + 16)[0]
    struct.pack_into("<I", raw, cd_off + 24, 0xFFFFFFF0)
    (d / "ckpt-1.pt").write_bytes(bytes(raw))
    v = returns_within(lambda: check_entry(str(d / "ckpt-1.pt"), "torch").verdict, 30)
    assert not v.valid


# ---------------------------------------------------------------- walks

@pytest.fixture
def deep_dirs():
    """Trees to remove with rm (fts: iterative) after the test: pytest's own cleanup of
    old tmp dirs is recursive and dies of a 3000-deep chain, in every later run."""
    made: list[Path] = []
    yield made
    for p in made:
        subprocess.run(["rm", "-rf", "--", str(p)], check=False, timeout=300)


def _deep_chain(root: Path, depth: int) -> None:
    # by dir fds: a 3000-deep path is longer than PATH_MAX
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def test_3000_deep_chain_in_an_hf_entry_is_that_entrys_verdict_not_an_empty_index(tmp_path, deep_dirs):
    """Found: validate's recursive file walk raised RecursionError on a 3000-deep chain of
    dirs and the job's whole index came back empty."""
    ck = tmp_path / "ck"
    e = _hf_entry(ck, 4)
    deep_dirs.append(e)
    _deep_chain(e, 3000)
    write_checkpoint(ck, 2, {"w.bin": b"w" * 100})
    infos = returns_within(lambda: scan(ck), 120)
    by = {i.name: i for i in infos}
    assert by["step-00000002"].valid
    assert not by["checkpoint-4"].valid and "deeper than" in (by["checkpoint-4"].invalid_reason or "")


def test_100000_name_dir_in_an_entry_is_that_entrys_verdict(tmp_path):
    ck = tmp_path / "ck"
    e = _hf_entry(ck, 4)
    many = e / "many"
    many.mkdir()
    fd = os.open(many, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(100_000):
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    write_checkpoint(ck, 2, {"w.bin": b"w" * 100})
    infos = returns_within(lambda: scan(ck), 120)
    by = {i.name: i for i in infos}
    assert by["step-00000002"].valid
    assert not by["checkpoint-4"].valid and "more than" in (by["checkpoint-4"].invalid_reason or "")


def test_a_dir_past_the_names_bound_is_not_listed_again_while_unchanged(tmp_path, monkeypatch):
    """Found: a job's 100,000-name dir was listed to the bound at every scan (its dir
    changed every 20 ms); the worker thread took and released the GIL twice per name and,
    on a loaded machine, `status` waited for the GIL behind it (p99 8 -> 340 ms). While
    the dir's mtime and ctime stand still it is past the bound without a listing; once a
    name goes (they move), it is listed again and can come under the bound."""
    from trainsup.checkpoint import walk as walk_mod
    d = tmp_path / "e"
    (d / "many").mkdir(parents=True)
    for i in range(150):
        (d / "many" / f"f{i}").touch()
    many_ino = (d / "many").stat().st_ino
    listed: list[int] = []            # listings of `many`
    real = walk_mod.listdir

    def counting(fd: int, limit: int = walk_mod.MAX_DIR_NAMES):
        if os.fstat(fd).st_ino == many_ino:
            listed.append(limit)
        return real(fd, limit)

    monkeypatch.setattr(walk_mod, "listdir", counting)       # a spy: the real listing runs

    def walk_all() -> list[str]:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return [rel for rel, _ in walk_mod.walk(fd, per_dir=100)]
        finally:
            os.close(fd)

    for _ in range(3):
        with pytest.raises(walk_mod.TooLarge, match="many/: more than 100 names"):
            walk_all()
    assert len(listed) == 1, listed        # once; then never again while unchanged
    for i in range(60):
        (d / "many" / f"f{i}").unlink()
    assert len(walk_all()) == 1 + 90
    assert len(listed) == 2


# ---------------------------------------------------------------- bounded values

def _manifest(**over: Any) -> dict:
    m = {"format": "trainsup-checkpoint/1", "step": 1, "files": {"a": {"size": 1, "xxh3_128": "0" * 32}}}
    m.update(over)
    return m


def test_manifest_with_a_2mb_reason_is_refused():
    """Found: 15 manifests with a 2 MB `reason` grew the state DB and the log."""
    with pytest.raises(ManifestError, match="reason"):
        parse_manifest(json.dumps(_manifest(reason="x" * (2 << 20))).encode())


def test_manifest_with_120mb_of_metrics_is_refused_unread():
    raw = b'{"format": "trainsup-checkpoint/1", "metrics": {' + b",".join(
        b'"m%d": 1.0' % i for i in range(10_000_000)) + b"}}"
    assert len(raw) > 120_000_000
    with pytest.raises(ManifestError, match="more than"):
        parse_manifest(raw)


def test_manifest_step_of_10_pow_400_is_refused():
    """Found: a manifest step of 10**400 made the metrics scrape unparseable and crashed
    `trainsup plot`."""
    raw = b'{"format": "trainsup-checkpoint/1", "step": 1' + b"0" * 400 + b', "files": {}}'
    with pytest.raises(ManifestError, match="step"):
        parse_manifest(raw)


def test_verdict_counters_and_metrics_are_bounded_whatever_a_format_found():
    v = Verdict("paddle", True, None, 10**5000, -1, metrics={f"m{i}": 1.0 for i in range(1000)} | {"x": "s"})
    assert not v.valid and v.step is None and v.epoch is None
    assert "0..2**63-1" in (v.invalid_reason or "")
    assert len(v.metrics) <= 64
    assert Verdict.from_json(v.to_json()) == v       # the cache row round-trips


def test_paddle_states_global_step_10_pow_5000_is_that_entrys_verdict_not_an_empty_index(tmp_path):
    """Found: a Paddle `.states` with global_step = 10**5000 broke the verdict's JSON: `scan
    failed`, the whole index empty, and the job relaunched from scratch although a valid
    checkpoint was on disk."""
    ck = tmp_path / "ck"
    ck.mkdir()
    write_checkpoint(ck, 3, {"w.bin": b"w" * 100})
    (ck / "model_9.pdparams").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    (ck / "model_9.states").write_bytes(pickle.dumps({"global_step": 10**5000, "epoch": 1}, protocol=2))
    infos = returns_within(lambda: scan(ck), 60)
    by = {i.name: i for i in infos}
    assert by["step-00000003"].valid
    pd = [i for i in infos if i.format == "paddle"]
    assert pd and all(not i.valid for i in pd), pd
    assert all(i.step is None or i.step < 2**63 for i in infos)
    json.dumps([i.step for i in infos])      # what the DB, the scrape and plot get


def test_inline_scan_on_the_loop_never_waits_for_the_state_db_lock(tmp_path):
    """Found: status took 300 ms while another job's history was committed: the loop's
    inline scan read the verdict cache under the lock the writer holds across an fsync."""
    from trainsup.daemon.checkpoints import _CachedOnly, _NeedsHashing
    from trainsup.daemon.state import StateDB
    db = StateDB(tmp_path)
    db.put("k", "v")
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.lock:
            held.set()
            release.wait(30)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        assert held.wait(10)
        start = time.monotonic()
        with pytest.raises(_NeedsHashing):
            _CachedOnly(db).get("k")
        assert time.monotonic() - start < 1
    finally:
        release.set()
        t.join(10)
    assert _CachedOnly(db).get("k") == "v"
