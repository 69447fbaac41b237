"""One checkpoint out of the store into the checkpoint dir (daemon/mirror/restore.py), on a
real file:// store and real dirs: a large file comes down in parallel ranges, its hash is
computed from the bytes as they arrive (never read back), and a copy whose bytes differ
from the commit object's hashes is refused with nothing renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fsspec")

from trainsup.checkpoint import write_checkpoint  # noqa: E402
from trainsup.checkpoint.dirhandle import DirHandle  # noqa: E402
from trainsup.checkpoint.objectstore import Store  # noqa: E402
from trainsup.daemon.mirror import layout, restore, upload  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def small_ranges(monkeypatch):
    # a 5 MiB file in 1 MiB ranges: the parallel, out-of-order path without 100s of MiB
    monkeypatch.setattr(restore, "RANGE_MIN", 1 * MiB)
    monkeypatch.setattr(restore, "RANGE_MAX", 1 * MiB)


def _uploaded(tmp_path: Path) -> tuple[Store, layout.RemoteEntry, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    weights = os.urandom(5 * MiB + 123)
    step = Path(write_checkpoint(src, 7, {"weights.bin": weights, "state.json": b'{"step": 7}'}))
    store = Store(f"file://{tmp_path / 'store'}/job")
    with DirHandle.open(src) as h:
        entry = upload.upload_entry(
            store, h, name=step.name, rel=step.name, members=(), key=layout.entry_key(step.name, 7, 0.0),
            step=7, created=0.0, reason=None, resume=step.name, holder="test", rate=None,
            progress=upload.Progress(), journal_dir=None, may_commit=lambda: True)
    return store, entry, weights


def _restore(tmp_path: Path, store: Store, entry: layout.RemoteEntry, parallel: int = 4) -> tuple[Path, str]:
    dst = tmp_path / "fresh"
    dst.mkdir(exist_ok=True)
    with DirHandle.open(dst) as h:
        return dst, restore.restore_entry(store, h, entry, "trainsup", parallel, upload.Progress())


@pytest.mark.parametrize("parallel", [1, 4])
def test_a_large_file_restored_in_ranges_is_byte_identical(tmp_path, small_ranges, parallel):
    store, entry, weights = _uploaded(tmp_path)
    assert len(restore.ranges_of(len(weights), parallel)) == 6
    dst, rel = _restore(tmp_path, store, entry, parallel)
    assert (dst / rel / "weights.bin").read_bytes() == weights
    assert sorted(p.name for p in dst.iterdir()) == [entry.name]       # no temp dir left


@pytest.mark.parametrize("where", [0, 3 * MiB + 5, 5 * MiB + 122])
def test_a_store_object_whose_bytes_differ_from_the_commit_is_refused_and_nothing_is_renamed(
        tmp_path, small_ranges, where):
    store, entry, _ = _uploaded(tmp_path)
    obj = Path(store.path(layout.data_rel(entry.key, f"{entry.name}/weights.bin")))
    data = bytearray(obj.read_bytes())
    data[where] ^= 0xFF                         # same size: only the hash can tell
    obj.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="hash does not match"):
        _restore(tmp_path, store, entry)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_ranges_are_few_and_bounded():
    assert restore.ranges_of(10, 4) == [(0, 10)]
    assert len(restore.ranges_of(64 * MiB, 2)) == 2                    # one request per thread
    assert restore.ranges_of(0, 4) == []
    for size in (100 * MiB, 512 * MiB, 64 << 30):
        for parallel in (1, 2, 4, 16, 64):
            ranges = restore.ranges_of(size, parallel)
            assert ranges[0][0] == 0 and ranges[-1][1] == size
            assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
            biggest = max(b - a for a, b in ranges)
            assert restore.RANGE_MIN <= biggest <= restore.RANGE_MAX or len(ranges) == 1
            # what the daemon holds at once for one restore, whatever `parallel` asks
            assert restore.workers_for(ranges, parallel) * biggest <= restore.IN_FLIGHT_MAX


def test_the_mirror_takes_the_store_the_loads_probe_opened_once_and_never_shares_it(tmp_path):
    from trainsup.checkpoint import objectstore
    url = f"file://{tmp_path / 'probed'}/job"
    objectstore._PROBED.clear()
    assert objectstore.probe(url + "/", {}) is None
    probed = objectstore._OPENED[objectstore._key(url, {})][1]
    first = objectstore.open_store(url, {})
    second = objectstore.open_store(url, {})
    assert objectstore._OPENED.get(objectstore._key(url, {})) is None
    assert first is probed                      # its session and credentials, already made
    assert second is not first                  # one job's session is never another's
    assert first.url == second.url == url
