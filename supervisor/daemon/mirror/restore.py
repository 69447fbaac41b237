"""One checkpoint out of the store into the checkpoint dir (blocking; on a mirror thread).

Downloaded beneath a temp dir inside the checkpoint dir (`.trainsup-restore.<key>`: a dot
name, never a checkpoint; the same filesystem, so the final rename is atomic), large files in
parallel ranges. Every file's xxh3-128 is computed from the bytes as they arrive (never read
back) and checked against the commit object; the format's own validator must call the entry
valid; every file and every directory of the temp tree is fsynced; only then is it renamed
into place (a group's members in reverse order, so its commit marker lands last) and the
checkpoint dir fsynced. A crash at any instant leaves either no renamed entry or one whose
bytes are on disk. A failure anywhere removes the temp dir: nothing half-restored is ever
offered for resume.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash

from ...checkpoint import formats, jobfile
from ...checkpoint import index as ckpt_index
from ...checkpoint.dirhandle import DirHandle
from ...checkpoint.objectstore import Store, StoreError
from ...checkpoint.walk import listdir
from . import layout
from .upload import Progress

# A file is split into about `parallel` ranges, each one request, of RANGE_MIN to RANGE_MAX
# bytes: a file up to RANGE_MIN is one request. Fewer, larger requests: each request has a
# fixed cost at the store (on moto each ranged GET of a 512 MiB object cost a copy of the
# whole object: 32 MiB ranges took 4.3 s where four 128 MiB ones took 1.5 s). A range is
# held in the daemon's memory until it is written and hashed, so the ranges in flight never
# hold more than IN_FLIGHT_MAX together, whatever `parallel` says (it may be 64): the daemon
# every job shares does not grow by gigabytes for one job's restore.
RANGE_MIN = 32 << 20
RANGE_MAX = 128 << 20
IN_FLIGHT_MAX = 256 << 20
TMP_PREFIX = ".trainsup-restore."
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SYNC_FILE_RANGE_WRITE = 2


def _writeback_starter() -> Any:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): starts writing a range to disk without
    waiting, so the fsync before the rename finds the data mostly written (it waited for
    all of it: 0.2 s per 512 MiB here, after the download). None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_start_writeback = _writeback_starter()


def ranges_of(size: int, parallel: int) -> list[tuple[int, int]]:
    parallel = max(1, parallel)
    step = min(RANGE_MAX, max(RANGE_MIN, -(-size // parallel)))
    if step * parallel > IN_FLIGHT_MAX:
        step = max(RANGE_MIN, IN_FLIGHT_MAX // parallel)
    return [(o, min(o + step, size)) for o in range(0, size, step)]


def workers_for(ranges: list[tuple[int, int]], parallel: int) -> int:
    """Threads fetching ranges at once: `parallel`, fewer when their ranges together
    would hold more than IN_FLIGHT_MAX in memory."""
    biggest = max((b - a for a, b in ranges), default=1)
    return max(1, min(parallel, len(ranges), IN_FLIGHT_MAX // biggest))


class _HashInOrder:
    """The xxh3-128 of a file whose ranges arrive on several threads. Each thread hashes the
    bytes it fetched once every range before its own is hashed, so the file is hashed from
    the bytes as they arrive and never read back; a thread holds its range meanwhile (the
    ranges are taken in file order, so the earliest unhashed one is always being fetched,
    never waiting). A failed range ends every wait."""

    def __init__(self) -> None:
        self.h = xxhash.xxh3_128()
        self.at = 0
        self.failed = False
        self.cond = threading.Condition()

    def add(self, off: int, data: memoryview, cancelled: threading.Event) -> None:
        with self.cond:
            while self.at != off:
                if self.failed or cancelled.is_set():
                    raise StoreError("transient", "restore cancelled")
                self.cond.wait(0.5)
            self.h.update(data)
            self.at += len(data)
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def hexdigest(self, size: int) -> str:
        assert self.at == size, (self.at, size)
        return self.h.hexdigest()


def clear_stale(handle: DirHandle) -> None:
    """Temp dirs a crashed restore left (fd-based rmtree: never follows a link)."""
    try:
        names = [n for n, _ in listdir(handle.fd)[0] if n.startswith(TMP_PREFIX)]
    except OSError:
        return
    for n in names:
        try:
            # not a job path: a temp dir of the daemon's own (TMP_PREFIX); by dir fd, never through a link
            shutil.rmtree(n, dir_fd=handle.fd)
        except OSError:
            pass


def _mkdirs_beneath(handle: DirHandle, base_fd: int, rel_dir: str) -> int:
    fd = os.dup(base_fd)
    for part in [p for p in rel_dir.split("/") if p]:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        nfd = handle.open_beneath(part, _DIR, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _download(store: Store, key: str, f: layout.RemoteFile, out_fd: int, parallel: int,
              progress: Progress) -> str:
    """Fetch `f` into out_fd; returns the xxh3-128 of the bytes fetched."""
    remote = layout.data_rel(key, f.rel)
    hashed = _HashInOrder()
    if f.size == 0:
        return hashed.hexdigest(0)
    ranges = ranges_of(f.size, parallel)

    def fetch(r: tuple[int, int]) -> None:
        try:
            if progress.cancelled.is_set() or hashed.failed:
                raise StoreError("transient", "restore cancelled")
            data = store.read_range(remote, r[0], r[1])
            if len(data) != r[1] - r[0]:
                raise StoreError("transient", f"{remote}: short read ({len(data)} of {r[1] - r[0]} bytes)")
            mv = memoryview(data)
            done = 0
            while done < len(mv):
                done += os.pwrite(out_fd, mv[done:], r[0] + done)
            if _start_writeback is not None:
                _start_writeback(out_fd, r[0], r[1] - r[0], _SYNC_FILE_RANGE_WRITE)
            progress.add(r[1] - r[0])
            hashed.add(r[0], mv, progress.cancelled)
        except BaseException:
            hashed.fail()
            raise

    if len(ranges) == 1 or parallel <= 1:
        for r in ranges:
            fetch(r)
    else:
        with ThreadPoolExecutor(max_workers=workers_for(ranges, parallel), thread_name_prefix="trainsup-range") as ex:
            for fut in [ex.submit(fetch, r) for r in ranges]:
                fut.result()
    return hashed.hexdigest(f.size)


def _fsync_tree(handle: DirHandle, fd: int, depth: int = 0) -> None:
    """fsync every directory beneath the temp dir (the one at `fd` included): the entries
    naming the restored files are on disk before the tree is renamed into place."""
    if depth > 64:
        raise ValueError("restored tree too deep")
    for name, st in listdir(fd)[0]:
        if st is not None and stat.S_ISDIR(st.st_mode):
            sub = handle.open_beneath(name, _DIR, dir_fd=fd)
            try:
                _fsync_tree(handle, sub, depth + 1)
            finally:
                os.close(sub)
    os.fsync(fd)


def restore_entry(store: Store, handle: DirHandle, entry: layout.RemoteEntry, fmt: str,
                  parallel: int, progress: Progress) -> str:
    """Download, verify and move `entry` into the checkpoint dir; returns the relative
    path TRAINSUP_RESUME_FROM will name. Raises StoreError (kind `full` for a full local
    disk) or ValueError (the copy does not verify); nothing is left behind on failure."""
    tmp = TMP_PREFIX + entry.key[:80]
    clear_stale(handle)
    progress.total, progress.done = entry.bytes, 0
    os.mkdir(tmp, 0o755, dir_fd=handle.fd)
    try:
        tfd = handle.open_beneath(tmp)
        try:
            for f in entry.files:
                parent, _, leaf = f.rel.rpartition("/")
                dfd = _mkdirs_beneath(handle, tfd, parent)
                try:
                    out = jobfile.create_exclusive(dfd, leaf, 0o644)
                finally:
                    os.close(dfd)
                try:
                    if f.size:
                        os.posix_fallocate(out, 0, f.size)      # a full disk fails here, at once
                    got = _download(store, entry.key, f, out, parallel, progress)
                    if os.fstat(out).st_size != f.size:
                        raise ValueError(f"{f.rel}: {os.fstat(out).st_size} bytes, the store's commit says {f.size}")
                    if got != f.xxh3_128:
                        raise ValueError(f"{f.rel}: hash does not match the store's commit object")
                    os.fsync(out)
                finally:
                    os.close(out)
            # The format's own verdict on the restored copy, as a scan of the dir would give.
            held = DirHandle(handle.path / tmp, os.dup(tfd))
            try:
                found = {i.name: i for i in ckpt_index.scan(held, fmt)}
            finally:
                held.close()
            info = found.get(entry.name)
            if info is None or not info.valid:
                why = info.invalid_reason if info is not None else "not recognised as a checkpoint"
                raise ValueError(f"restored copy of {entry.name} is not valid: {why}")
            _fsync_tree(handle, tfd)
            for top in reversed(entry.tops):
                _move_into_place(handle, tfd, top)
            _after_restore(handle, info.format, entry.name)
            os.fsync(handle.fd)
        finally:
            os.close(tfd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError("full", f"local disk full during restore of {entry.name}: {e.strerror}") from None
        raise
    finally:
        try:
            # not a job path: the daemon's own temp dir (made above); rmtree by dir fd never follows a link
            shutil.rmtree(tmp, dir_fd=handle.fd)
        except OSError:
            pass
    return entry.resume


def _after_restore(handle: DirHandle, fmt: str, name: str) -> None:
    """The framework's own bookkeeping for what was restored (TF's state file), so its own
    resume finds it on a machine that never saw the save."""
    hook = formats.hook(formats.FORMATS.get(fmt), "after_restore", None)
    if hook is None:
        return
    parent, _, base = name.rpartition("/")
    dfd = handle.open_beneath(parent) if parent else os.dup(handle.fd)
    try:
        hook(dfd, base)
    finally:
        os.close(dfd)


def _move_into_place(handle: DirHandle, tfd: int, rel: str) -> None:
    """Rename `rel` from the temp dir into the checkpoint dir; into an existing directory
    (lightning_logs/) file by file."""
    parent, _, leaf = rel.rpartition("/")
    src_dir = handle.open_beneath(parent, _DIR, dir_fd=tfd) if parent else os.dup(tfd)
    try:
        dst_dir = _mkdirs_beneath(handle, handle.fd, parent)
        try:
            try:
                os.rename(leaf, leaf, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    raise
            sub = handle.open_beneath(leaf, _DIR, dir_fd=src_dir)
            try:
                names = [n for n, _ in listdir(sub)[0]]
            finally:
                os.close(sub)
            for name in names:
                _move_into_place(handle, tfd, f"{rel}/{name}")
        finally:
            os.close(dst_dir)
    finally:
        os.close(src_dir)
