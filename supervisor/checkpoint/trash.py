"""Deleting checkpoints without ever deleting anything outside the checkpoint dir.

An entry is first renamed into `<ckpt_dir>/.trainsup-trash/` (same filesystem, atomic: the
index never sees half a checkpoint), then removed through directory file descriptors:
every directory is opened with O_NOFOLLOW|O_DIRECTORY relative to its parent's fd, its
identity checked with fstat against the lstat that chose it, and names are unlinked or
rmdir'ed relative to that fd. A symlink is unlinked itself, never its target; a racer that
swaps a subdirectory for a symlink makes the open fail (ELOOP/ENOTDIR) or the rmdir fail,
and the name is looked at again.

When the daemon runs as root and the checkpoint dir belongs to another user, the removal
runs in a forked child that dropped to that user first, so a user cannot make root delete
what the user could not delete.

A crash halfway leaves debris only inside the trash dir; `empty_trash` finishes it.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
import time
from typing import Callable, Optional, Union

from ..crashpoints import crash_point
from .format import TMP_DIR

TRASH_DIR = ".trainsup-trash"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RETRIES = 100
_TMP_ENTRY_RE = re.compile(r"^step-\d{8,}\.(\d+)$")

PathLike = Union[str, os.PathLike]


class DeleteError(OSError):
    """An entry could not be deleted; whatever was moved aside is left in the trash dir."""


def delete_entry(ckpt_dir: PathLike, name: str) -> None:
    """Delete ckpt_dir/name (`name` may be `.trainsup-tmp/<entry>`), never through a link."""
    parts = name.split("/")
    if (not name or len(parts) > 2 or any(p in ("", ".", "..") for p in parts)
            or parts[0] == TRASH_DIR or (len(parts) == 2 and parts[0] != TMP_DIR)):
        raise ValueError(f"{name!r} is not an entry of the checkpoint dir")
    _as_owner(os.fspath(ckpt_dir), _delete_entry, os.fspath(ckpt_dir), name)


def empty_trash(ckpt_dir: PathLike) -> None:
    """Finish deletions a crash interrupted."""
    _as_owner(os.fspath(ckpt_dir), _empty_trash, os.fspath(ckpt_dir))


def collect_stale_tmp(ckpt_dir: PathLike, older_than_s: float, now: Optional[float] = None) -> list[str]:
    """Delete in-progress dirs of dead writers: pid (the `.pid` suffix) gone, or unchanged
    for older_than_s (pid reused, or a writer in another pid namespace). Returns their names.

    Caveat: a writer in another pid namespace whose pid happens to be free here is taken as
    dead; jobs in containers should keep their tmp dir young (it is, while files land).
    """
    now = time.time() if now is None else now
    tmp = os.path.join(os.fspath(ckpt_dir), TMP_DIR)
    try:
        if stat.S_ISLNK(os.lstat(tmp).st_mode):
            return []
        with os.scandir(tmp) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for e in entries:
        m = _TMP_ENTRY_RE.match(e.name)
        try:
            age = now - _newest_mtime(e)
        except FileNotFoundError:
            continue
        if age > older_than_s or (m is not None and not _pid_alive(int(m.group(1)))):
            try:
                delete_entry(ckpt_dir, f"{TMP_DIR}/{e.name}")
            except FileNotFoundError:
                continue  # the writer committed it meanwhile
            removed.append(e.name)
    return removed


# ---------------------------------------------------------------- mechanism

def _delete_entry(ckpt_dir: str, name: str) -> None:
    dfd = _open_root(ckpt_dir)
    try:
        tfd = _open_trash(dfd)
        try:
            parent_fd, base = dfd, name
            sub_fd = None
            if "/" in name:
                sub, base = name.split("/")
                sub_fd = parent_fd = os.open(sub, _DIR_FLAGS, dir_fd=dfd)
            try:
                target = f"{base}.{time.time_ns()}.{os.getpid()}"
                os.rename(base, target, src_dir_fd=parent_fd, dst_dir_fd=tfd)
            finally:
                if sub_fd is not None:
                    os.close(sub_fd)
            crash_point("trash-rename")
            _remove(tfd, target)
        finally:
            os.close(tfd)
    finally:
        os.close(dfd)


def _empty_trash(ckpt_dir: str) -> None:
    dfd = _open_root(ckpt_dir)
    try:
        try:
            tfd = os.open(TRASH_DIR, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return
        try:
            with os.scandir(tfd) as it:
                names = [e.name for e in it]
            for n in names:
                _remove(tfd, n)
        finally:
            os.close(tfd)
    finally:
        os.close(dfd)


def _open_root(ckpt_dir: str) -> int:
    try:
        return os.open(ckpt_dir, _DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise DeleteError(e.errno, f"{ckpt_dir}: checkpoint dir is a symlink or not a directory; "
                                       "nothing deleted") from None
        raise


def _open_trash(dfd: int) -> int:
    try:
        os.mkdir(TRASH_DIR, 0o700, dir_fd=dfd)
    except FileExistsError:
        pass
    try:
        return os.open(TRASH_DIR, _DIR_FLAGS, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise DeleteError(e.errno, f"{TRASH_DIR} is not a real directory; nothing deleted") from None
        raise


def _remove(parent_fd: int, name: str) -> None:
    """Remove parent_fd/name and everything under it, following no symlink."""
    for _ in range(_RETRIES):
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            try:
                os.unlink(name, dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                continue  # swapped for a directory since the lstat
            return
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                continue  # swapped for a link or file since the lstat: look again
            raise
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue  # a different directory than the one we chose
            with os.scandir(fd) as it:
                children = [c.name for c in it]
            for c in children:
                _remove(fd, c)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ENOTEMPTY, errno.EEXIST):
                continue  # swapped or refilled meanwhile
            raise
    raise DeleteError(errno.EAGAIN, f"{name}: kept changing during deletion; left in {TRASH_DIR}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(e: os.DirEntry) -> float:
    newest = e.stat(follow_symlinks=False).st_mtime
    if not e.is_dir(follow_symlinks=False):
        return newest
    stack = [e.path]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for c in it:
                    newest = max(newest, c.stat(follow_symlinks=False).st_mtime)
                    if c.is_dir(follow_symlinks=False):
                        stack.append(c.path)
        except FileNotFoundError:
            pass
    return newest


def _as_owner(ckpt_dir: str, fn: Callable, *args) -> None:
    """Run fn(*args) as the owner of ckpt_dir when we are root and it is someone else's."""
    if os.geteuid() != 0:
        fn(*args)
        return
    st = os.lstat(ckpt_dir)
    if st.st_uid == 0 or stat.S_ISLNK(st.st_mode):
        fn(*args)  # a symlink root is refused inside fn
        return
    try:
        gid = pwd.getpwuid(st.st_uid).pw_gid
    except KeyError:
        gid = st.st_gid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only os-level calls, then _exit, never back into the caller
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(st.st_uid)
            fn(*args)
            os.write(w, b"OK")
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent through the pipe
            try:
                os.write(w, f"{type(e).__name__}:{getattr(e, 'errno', 0) or 0}:{e}".encode()[:4000])
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    # The verdict travels through the pipe, not the exit status: the daemon, a child
    # subreaper, may reap this child from its SIGCHLD handler before waitpid runs here.
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    report = b"".join(chunks)
    if report != b"OK":
        kind, _, rest = report.decode(errors="replace").partition(":")
        code, _, msg = rest.partition(":")
        if kind == "FileNotFoundError":
            raise FileNotFoundError(errno.ENOENT, msg)
        if kind == "ValueError":
            raise ValueError(msg)
        raise DeleteError(int(code) if code.isdigit() else errno.EIO,
                          f"deletion as uid {st.st_uid} in {ckpt_dir} failed: {msg or 'child died'}")
