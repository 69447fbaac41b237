"""A checkpoint deleted while it is validated is not read on to its end.

Found with the turns of long work: a job's rotation (or its user) deleted a large entry
while the daemon hashed it, and the worker went on hashing the unlinked file to its last
byte for a verdict no one would read. The stream looks, every half second, whether its
file is still linked; once it is not, the entry is gone as if it had vanished before the
check began: the scan leaves it out and the next scan (the deletion's inotify event) sees
the dir as it is.
"""

from __future__ import annotations

import shutil
import threading
import time

from trainsup.checkpoint import budget, write_checkpoint
from trainsup.checkpoint.index import scan

SIZE = 64 << 20
READ_BPS = 8 << 20          # the whole file: about 8 s at this speed


def test_an_entry_deleted_while_hashed_leaves_the_scan_at_once(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w.bin": b"s" * 100})
    big = write_checkpoint(ck, 2, {"w.bin": lambda p: p.write_bytes(b"x" * SIZE)})
    monkeypatch.setattr(budget, "_SLOW_READ_BPS", float(READ_BPS))   # a slow disk: real reads, slowed
    got: list = []
    read_before = _bytes_read()
    t = threading.Thread(target=lambda: got.append(scan(ck)), daemon=True)
    t.start()
    time.sleep(1.0)             # well into the 8 s the hashing would take
    assert t.is_alive(), "the scan ended before the entry was deleted: nothing was proved"
    shutil.rmtree(big)
    t.join(60)
    assert not t.is_alive()
    names = [i.name for i in got[0]]
    assert names == ["step-00000001"], names
    # what this process read meanwhile: about a second's worth at that speed and the
    # chunks read ahead, not the whole file
    read = _bytes_read() - read_before
    assert read < SIZE // 2, f"{read} of the file's {SIZE} bytes read: it was hashed on after its deletion"


def _bytes_read() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")
