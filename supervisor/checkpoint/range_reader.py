"""A forward-only view of one file, read sequentially by a helper thread.

Validating a cold checkpoint is reading it: a zip member's CRC-32 or a TF tensor's CRC32C
must not wait for the disk, and the disk must not wait for the checksum. One reader thread
preads the file front to back into a small pool of buffers (the kernel sees the same
pattern as a plain `cat`); the calling thread parses headers and checksums what it is
handed. pread and both CRC libraries release the GIL. The thread is private to one
`Stream` and joined by `close()`, also when the caller stops early.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

from . import budget

_CHUNK = 8 << 20
_DEPTH = 3
# How often a long read looks whether its file is still linked: a checkpoint deleted while
# it is validated (rotation by the job, the user) is not read on to its end for nothing.
_LINKED_EVERY_S = 0.5
_WAIT_TICK_S = 0.02         # a tick while waiting for the next chunk

Update = Callable[[memoryview, int], int]


class ShortRead(OSError):
    """The file ended before the stream did (it shrank while being checked)."""


class Stream:
    """Bytes [start, end) of fd, consumed front to back: read(), checksum(), skip_to()."""

    def __init__(self, fd: int, start: int, end: int, chunk: int = _CHUNK) -> None:
        self.pos = start
        self._fd = fd
        self._linked_at = time.monotonic()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._cur: tuple[int, memoryview, int] | None = None
        self._thread: threading.Thread | None = None
        if end - start <= chunk:
            # One chunk (most files of a small checkpoint): no thread, no pool, one pread.
            buf = memoryview(bytearray(max(0, end - start)))
            try:
                n = os.preadv(fd, [buf], start)
                budget.slow_read(n)
            except OSError as e:
                self._full.put(e)
                return
            if n > 0:
                self._full.put((start, buf, n))
            self._full.put(ShortRead(0, f"file ends at byte {start + n}, expected {end}") if n < end - start
                           else ShortRead(0, f"read past byte {end}"))
            return
        for _ in range(_DEPTH):
            self._free.put(memoryview(bytearray(chunk)))
        self._thread = threading.Thread(target=self._reader, args=(fd, start, end, chunk),
                                        name="checksum-reader", daemon=True)
        self._thread.start()

    def _reader(self, fd: int, off: int, end: int, chunk: int) -> None:
        try:
            while off < end:
                buf = self._free.get()
                if self._stop.is_set():
                    return
                n = os.preadv(fd, [buf[: min(chunk, end - off)]], off)
                budget.slow_read(n)
                if n <= 0:
                    self._full.put(ShortRead(0, f"file ends at byte {off}, expected {end}"))
                    return
                self._full.put((off, buf, n))
                off += n
            self._full.put(ShortRead(0, f"read past byte {end}"))
        except OSError as e:
            self._full.put(e)

    def _chunk(self) -> tuple[int, memoryview, int]:
        cur = self._cur
        if cur is not None and cur[0] <= self.pos < cur[0] + cur[2]:
            return cur
        while True:
            if cur is not None:
                self._free.put(cur[1])
            while True:
                # a slow disk (a network file system) is waited for in turns too: while the
                # reader thread reads ahead, this task ticks, and may let another job's
                # work go first, or be cancelled, instead of holding its slot through the read
                try:
                    item = self._full.get(timeout=_WAIT_TICK_S)
                    break
                except queue.Empty:
                    budget.tick()
            if isinstance(item, BaseException):
                self._cur = None
                raise item
            cur = self._cur = item
            # every chunk counts against the verdict's read budget (a sparse file's zeros
            # stop here), and is where long work yields and is cancelled (budget.py)
            budget.tick(cur[2])
            if time.monotonic() - self._linked_at > _LINKED_EVERY_S:
                self._linked_at = time.monotonic()
                if os.fstat(self._fd).st_nlink == 0:
                    # as if it had vanished before the check began: no verdict, that entry
                    # leaves the index (the scan drops what is gone)
                    raise FileNotFoundError(errno.ENOENT, "removed while being checked")
            if self.pos < cur[0] + cur[2]:
                return cur

    def skip_to(self, off: int) -> None:
        if off < self.pos:
            raise ValueError(f"cannot go back from byte {self.pos} to {off}")
        self.pos = off

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            off, buf, size = self._chunk()
            lo = self.pos - off
            take = min(n - len(out), size - lo)
            out += buf[lo:lo + take]
            self.pos += take
        return bytes(out)

    def checksum(self, n: int, update: Update, crc: int = 0) -> int:
        while n > 0:
            off, buf, size = self._chunk()
            lo = self.pos - off
            take = min(n, size - lo)
            crc = update(buf[lo:lo + take], crc)
            self.pos += take
            n -= take
        return crc

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        for _ in range(_DEPTH):
            self._free.put(memoryview(bytearray(0)))  # wake a reader waiting for a buffer
        self._thread.join()

    def __enter__(self):  # -> Self (3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checksum_ranges(fd: int, ranges: Sequence[tuple[int, int]], update: Update) -> list[int]:
    """update(data, running) -> running over each (offset, length), in the order given."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    results = [0] * len(ranges)
    live = [i for i in order if ranges[i][1] > 0]
    if not live:
        return results
    end = -1
    for i in live:
        off, n = ranges[i]
        if off < end:
            raise ValueError(f"ranges overlap at byte {off}")
        end = off + n
    with Stream(fd, ranges[live[0]][0], end) as s:
        for i in live:
            s.skip_to(ranges[i][0])
            results[i] = s.checksum(ranges[i][1], update)
    return results
