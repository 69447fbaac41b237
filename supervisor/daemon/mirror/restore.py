"""One checkpoint out of the store into the checkpoint dir (blocking; on a mirror thread).

Downloaded beneath a temp dir inside the checkpoint dir (`.trainsup-restore.<key>`: a dot
name, never a checkpoint; the same filesystem, so the final rename is atomic), large files in
parallel ranges; then every file's xxh3-128 is checked against the commit object and the
format's own validator must call the entry valid; only then is it renamed into place (a
group's members in reverse order, so its commit marker lands last) and the dir fsynced. A
failure anywhere removes the temp dir: nothing half-restored is ever offered for resume.
"""

from __future__ import annotations

import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import xxhash

from ...checkpoint import formats, jobfile
from ...checkpoint import index as ckpt_index
from ...checkpoint.dirhandle import DirHandle
from ...checkpoint.objectstore import Store, StoreError
from ...checkpoint.walk import listdir
from . import layout
from .upload import Progress

RANGE = 32 << 20            # files larger than this download in parallel ranges
TMP_PREFIX = ".trainsup-restore."
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


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
              progress: Progress) -> None:
    remote = layout.data_rel(key, f.rel)
    if f.size == 0:
        return
    ranges = [(o, min(o + RANGE, f.size)) for o in range(0, f.size, RANGE)]

    def fetch(r: tuple[int, int]) -> None:
        if progress.cancelled.is_set():
            raise StoreError("transient", "restore cancelled")
        data = store.read_range(remote, r[0], r[1])
        if len(data) != r[1] - r[0]:
            raise StoreError("transient", f"{remote}: short read ({len(data)} of {r[1] - r[0]} bytes)")
        mv = memoryview(data)
        off = r[0]
        while mv:
            n = os.pwrite(out_fd, mv, off)
            mv, off = mv[n:], off + n
        progress.done += r[1] - r[0]

    if len(ranges) == 1 or parallel <= 1:
        for r in ranges:
            fetch(r)
        return
    with ThreadPoolExecutor(max_workers=min(parallel, len(ranges)), thread_name_prefix="trainsup-range") as ex:
        for fut in [ex.submit(fetch, r) for r in ranges]:
            fut.result()


def _hash_fd(fd: int) -> str:
    h = xxhash.xxh3_128()
    off = 0
    while True:
        b = os.pread(fd, 8 << 20, off)
        if not b:
            return h.hexdigest()
        h.update(b)
        off += len(b)


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
                    out = jobfile.create_exclusive(dfd, leaf, 0o644, read_back=True)
                finally:
                    os.close(dfd)
                try:
                    if f.size:
                        os.posix_fallocate(out, 0, f.size)      # a full disk fails here, at once
                    _download(store, entry.key, f, out, parallel, progress)
                    if os.fstat(out).st_size != f.size:
                        raise ValueError(f"{f.rel}: {os.fstat(out).st_size} bytes, the store's commit says {f.size}")
                    if _hash_fd(out) != f.xxh3_128:
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
