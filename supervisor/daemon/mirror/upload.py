"""One checkpoint into the store (blocking; on a mirror thread).

Every file is opened through the held checkpoint dir fd (no symlink, no `..`, no mount
crossing: dirhandle.open_beneath), O_NONBLOCK, and must be a regular file: a job that swaps
a file for a link to /etc/shadow or a FIFO gets an error for that upload, never a root
daemon's copy of someone else's file in its bucket or a thread stuck on a pipe. Each file's
xxh3-128 is computed from the bytes read, once; if the file changed while it was read (size,
mtime or inode moved) the upload fails and is tried again later. The commit object is
written last, and only while `may_commit()` holds (the lease is still ours).

Resumable across a daemon crash at file granularity: a journal in the state dir lists the
files already in the store (with the identity of the local file they came from), so a
restarted daemon skips them when the store still has them at that size; the store's own
multipart upload carries each large file (s3fs, gcsfs and adlfs upload in parts).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ...checkpoint.dirhandle import DirHandle
from ...checkpoint.objectstore import Store, StoreError
from ...checkpoint.walk import listdir
from . import layout

CHUNK = 8 << 20
FILE_PARALLEL = 4                  # files of one entry uploaded at once (no max_rate)
BLOCK = 64 << 20                   # multipart part size for the store's writer
MAX_DEPTH = 64
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class EntryChanged(Exception):
    pass


@dataclass
class Progress:
    """Bytes sent so far, read by the loop for status (a plain int read); the files of one
    entry go up on several threads, which add under the lock."""
    total: int = 0
    done: int = 0
    resumed: int = 0            # bytes already in the store from before a daemon crash
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int, resumed: bool = False) -> None:
        with self.lock:
            self.done += n
            if resumed:
                self.resumed += n


def entry_files(handle: DirHandle, rel: str, members: tuple[str, ...]) -> list[str]:
    """The files of one entry, relative to the checkpoint dir: a framework group's members,
    a directory's regular files (iterative walk, bounded), or the file itself."""
    if members:
        return list(members)
    fd = handle.open_beneath(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return [rel]
    finally:
        os.close(fd)
    out: list[str] = []
    todo = [(rel, 0)]
    while todo:
        d, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise OSError(errno.ELOOP, f"{d}: nested deeper than {MAX_DEPTH}")
        dfd = handle.open_beneath(d)
        try:
            for name, st in listdir(dfd, layout.MAX_FILES + 1)[0]:
                sub = f"{d}/{name}"
                if st is not None and stat.S_ISDIR(st.st_mode):
                    todo.append((sub, depth + 1))
                elif st is not None and stat.S_ISREG(st.st_mode):
                    out.append(sub)
                else:
                    raise OSError(errno.EINVAL, f"{sub}: not a regular file (never uploaded)")
                if len(out) > layout.MAX_FILES:
                    raise OSError(errno.EFBIG, f"{rel}: more than {layout.MAX_FILES} files")
        finally:
            os.close(dfd)
    return sorted(out)


class Throttle:
    """A token bucket: at most `rate` bytes a second on average, bursts of one chunk."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.sent = 0

    def take(self, n: int, cancelled: threading.Event) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            cancelled.wait(ahead)


def _journal_path(journal_dir: Path | None, key: str) -> Path | None:
    return journal_dir / f"{key}.json" if journal_dir is not None else None


def _load_journal(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        # not a job path: the upload journal in the daemon's state dir
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_journal(path: Path | None, data: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # not a job path: the upload journal in the daemon's state dir
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass        # only costs a re-upload after a crash


def _identity(st: os.stat_result) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _send_file(store: Store, handle: DirHandle, rel: str, key: str, rate: int | None,
               progress: Progress, throttle: Throttle, journal: dict) -> tuple[layout.RemoteFile, list]:
    fd = handle.open_beneath(rel, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{rel}: not a regular file (never uploaded)")
        ident = _identity(st)
        done = journal.get(rel)
        if done and done.get("id") == ident and store.size(layout.data_rel(key, rel)) == st.st_size:
            progress.add(st.st_size, resumed=True)       # in the store from before a crash
            return layout.RemoteFile(rel, st.st_size, done["xxh3_128"]), ident
        h = xxhash.xxh3_128()
        remote = layout.data_rel(key, rel)
        if rate is None:
            # The store library's own upload (parallel multipart on S3): hash first, from the
            # page cache, then hand it the open file through /proc (the same inode, never a
            # path a job could swap).
            off = 0
            while True:
                b = os.pread(fd, CHUNK, off)
                if not b:
                    break
                h.update(b)
                off += len(b)
            counted = [0]

            from fsspec.callbacks import Callback

            class _Count(Callback):
                def call(self, *a: Any, **k: Any) -> None:      # the IO thread: a few additions, no more
                    v = int(self.value)
                    progress.add(v - counted[0])
                    counted[0] = v
            store._call(f"writing {remote}", store.fs.put_file, f"/proc/self/fd/{fd}", store.path(remote),
                        callback=_Count())
            progress.add(off - counted[0])
        else:
            # Chunks of a quarter second at the rate: the bucket's bursts stay small, so a
            # 1 MB/s limit never sends 8 MB at full speed.
            chunk = max(64 << 10, min(CHUNK, rate // 4))
            # and parts of a few seconds (S3's minimum part is 5 MiB): the writer sends a part
            # once its buffer fills, so the part size bounds the burst on the wire
            f = store.open_write(remote, max(5 << 20, min(BLOCK, rate * 4)))
            try:
                off = 0
                while True:
                    if progress.cancelled.is_set():
                        raise StoreError("transient", "upload cancelled")
                    b = os.pread(fd, chunk, off)
                    if not b:
                        break
                    h.update(b)
                    store._call(f"writing {remote}", f.write, b)
                    off += len(b)
                    progress.add(len(b))
                    throttle.take(len(b), progress.cancelled)
                store._call(f"writing {remote}", f.close)
            except BaseException:
                try:
                    f.discard()         # abort the multipart upload: no half object left
                except Exception:
                    pass
                raise
        if off != st.st_size or _identity(os.fstat(fd)) != ident:
            raise EntryChanged(f"{rel} changed while it was uploaded")
        return layout.RemoteFile(rel, st.st_size, h.hexdigest()), ident
    finally:
        os.close(fd)


def upload_entry(store: Store, handle: DirHandle, *, name: str, rel: str, members: tuple[str, ...],
                 key: str, step: int | None, created: float, reason: str | None, resume: str,
                 holder: str, rate: int | None, progress: Progress, journal_dir: Path | None,
                 may_commit: Callable[[], bool]) -> layout.RemoteEntry:
    files = entry_files(handle, rel, members)
    sizes = 0
    for r in files:
        try:
            fd = handle.open_beneath(r, _READ_FLAGS)
        except OSError as e:
            raise OSError(e.errno, f"{r}: {e.strerror}") from None
        try:
            sizes += os.fstat(fd).st_size
        finally:
            os.close(fd)
    progress.total, progress.done = sizes, 0
    jpath = _journal_path(journal_dir, key)
    journal = _load_journal(jpath)
    throttle = Throttle(rate)
    jlock = threading.Lock()

    def send(r: str) -> layout.RemoteFile:
        f, ident = _send_file(store, handle, r, key, rate, progress, throttle, journal)
        with jlock:
            journal[r] = {"id": ident, "xxh3_128": f.xxh3_128}
            _save_journal(jpath, journal)
        return f
    if rate is not None or len(files) == 1:
        sent = [send(r) for r in files]        # one bucket of bandwidth: in order
    else:
        # Several files at once, as the store library's own multi-file put does: one
        # connection per file does not fill a fast link.
        with ThreadPoolExecutor(max_workers=min(FILE_PARALLEL, len(files)),
                                thread_name_prefix="trainsup-upload") as ex:
            sent = list(ex.map(send, files))
    entry = layout.RemoteEntry(key=key, name=name, step=step, files=tuple(sent), resume=resume,
                               created=created, uploaded=time.time(), reason=reason, holder=holder)
    if not may_commit():
        raise StoreError("lost", "the lease on this job was taken over: not committed")
    # The commit object last: without it the entry is incomplete and never restored.
    # not a job path: the commit object in the store
    store.write_bytes(layout.commit_rel(key), layout.commit_body(entry))
    if jpath is not None:
        try:
            os.unlink(jpath)
        except OSError:
            pass
    return entry
