"""Issue 11 case 8: a checkpoint edited in place through a shared mmap (ctime unchanged)
was still offered for resume from its cached verdict. Real tmpfs and a real ext4 (loop)
mount; needs root."""

from __future__ import annotations

import mmap
import os
import subprocess
from pathlib import Path

import pytest

from trainsup.checkpoint import MemoryVerdictCache, write_checkpoint
from trainsup.checkpoint.dirhandle import DirHandle
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.reprove import change_cookie_available, latest_for_launch

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture(params=["tmpfs", "ext4"])
def fs(request, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(mnt)], check=True)
    else:
        img = tmp_path / "fs.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no loop mount here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def shared_map(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def test_shared_mmap_edit_is_caught_before_launch(fs):
    ck = fs / "ck"
    write_checkpoint(ck, 1, {"w.bin": b"\1" * (1 << 20)})
    write_checkpoint(ck, 2, {"w.bin": b"\2" * (1 << 20)})
    # a trainer keeps the file mapped; its first write faults and moves ctime ...
    m = shared_map(ck / "step-00000002" / "w.bin")
    try:
        m[10:11] = b"\2"                       # same byte: content still matches the manifest
        cache = MemoryVerdictCache()
        with DirHandle.open(ck) as h:
            infos = [i for i in scan(h, cache=cache) if i.managed]
            assert [i.valid for i in infos] == [True, True]
            # ... later writes to the same, already writable page do not (tmpfs: never
            # written back; ext4: until writeback write-protects the page again)
            m[20:21] = b"\xff"
            chosen = latest_for_launch(h.io_root, infos, cache)
            assert chosen is not None and chosen.name == "step-00000001", "the damaged checkpoint was offered"
    finally:
        m.close()


def test_change_cookie_is_not_for_userspace(fs):
    """The measurement behind the choice in reprove.py: statx gives no change cookie."""
    p = fs / "f"
    p.write_bytes(b"x")
    assert change_cookie_available(str(p)) is False
