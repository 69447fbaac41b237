"""Deleting one checkpoint entry: the mechanism, safe by construction.

What may be deleted, and what proves it (rotation.py decides *which* entries; this module
makes sure the deletion cannot reach anything else):

1. Only a direct entry of the job's checkpoint dir (or of its `.trainsup-tmp/`), named by
   its plain name: no `/` beyond that one level, no `.`/`..`, never the trash dir itself.
   Proof: the name check in `delete_entry`.
2. Only inside the directory the daemon resolved and opened for this job (a DirHandle held
   for the job's life): every open, stat, rename and unlink is relative to that fd or to
   fds opened beneath it with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV)
   (O_NOFOLLOW per component + mount-id/st_dev checks on older kernels). A symlink is
   unlinked as a name, never followed; `..` cannot be walked.
3. Never across a mount: before anything moves, the whole entry is walked with the same
   no-crossing opens; a mount point anywhere inside (a dataset bind-mounted into an old
   checkpoint) makes the entry undeletable (DeleteError EXDEV, reported) and nothing of it
   is touched. A mount appearing after that walk still cannot be entered during removal.
4. Never as anyone but the daemon: removal runs in the daemon's own worker thread. There is
   no forked deleter that drops to the dir owner's uid (the job's user could SIGSTOP
   it and freeze every job's rotation). Root cannot be tricked into deleting
   elsewhere because of 2 and 3, not because of a uid.
5. Atomic from the index's point of view: the entry is first renamed (one rename, same
   directory tree, so same filesystem) into `<dir>/.trainsup-trash/` under a short name of
   our own (a 250-byte entry name cannot overflow NAME_MAX there), then emptied. A crash
   halfway leaves debris only in the trash dir; `empty_trash` finishes the names it made.
6. Truth: `delete_entry` returns only when the name is gone from the checkpoint dir (checked
   with fstatat after the rename); callers record `deleted` after it returns, never before.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import time

from ..crashpoints import crash_point
from . import budget
from .dirhandle import CheckpointDirError, DirHandle
from .format import TMP_DIR

TRASH_DIR = ".trainsup-trash"
ASIDE_DIR = ".trainsup-aside"      # interrupted saves moved aside (aside.py)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PATH = os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW
_RETRIES = 100
# what _trash_name makes (and, before it, `<entry>.<ns>.<pid>`), fullmatch
_TRASH_NAME_RE = re.compile(r"d\.\d+\.\d+\.\d+(?:~.+)?|.+\.\d+\.\d+", re.DOTALL)
_ORIGINAL_RE = re.compile(r"d\.\d+\.\d+\.\d+~(.+)", re.DOTALL)
_counter = itertools.count()

DirLike = DirHandle | str | os.PathLike


class DeleteError(OSError):
    """An entry could not be deleted; nothing outside it was touched."""


def delete_entry(ckpt_dir: DirLike, name: str) -> None:
    """Delete ckpt_dir/name (`name` may be `.trainsup-tmp/<entry>`); return once it is gone.

    Raises FileNotFoundError if it was already gone, DeleteError if it could not be
    deleted (mount inside, read-only filesystem, immutable file...): then it is either
    untouched or wholly inside the trash dir.
    """
    parts = name.split("/")
    if (not name or len(parts) > 2 or any(p in ("", ".", "..") for p in parts)
            or "\0" in name or parts[0] == TRASH_DIR or (len(parts) == 2 and parts[0] != TMP_DIR)):
        raise ValueError(f"{name!r} is not an entry of the checkpoint dir")
    with _held(ckpt_dir) as h:
        _delete_entry(h, parts)


def delete_nested(ckpt_dir: DirLike, parent: str, name: str) -> None:
    """Delete ckpt_dir/parent/name through the trash of ckpt_dir itself, for frameworks that
    list the folder their saves sit in (Accelerate's `checkpoints/`: a `.trainsup-trash`
    appearing there broke its own `total_limit` rotation, which parses a number out of
    every name it finds). `parent` is opened beneath the held dir like every other path."""
    comps = parent.split("/")
    if (not parent or any(c in ("", ".", "..") for c in comps) or "\0" in parent or comps[0] in (TRASH_DIR, TMP_DIR)
            or not name or "/" in name or name in (".", "..") or "\0" in name):
        raise ValueError(f"{parent!r}/{name!r} is not an entry beneath the checkpoint dir")
    with _held(ckpt_dir) as h:
        _delete_entry(h, [parent, name])


def empty_trash(ckpt_dir: DirLike) -> list[str]:
    """Finish deletions a crash interrupted (only names this module made). Returns the
    original entry names it finished, where the trash name kept them (so the caller can
    record the `deleted` the crash cut short)."""
    finished: list[str] = []
    with _held(ckpt_dir) as h:
        try:
            tfd = h.open_beneath(TRASH_DIR)
        except FileNotFoundError:
            return finished
        try:
            # held dir fd: the trash dir, opened beneath the held dir
            with os.scandir(tfd) as it:
                names = [e.name for e in it if _TRASH_NAME_RE.fullmatch(e.name)]
            for n in names:
                _remove(h, tfd, n)
                m = _ORIGINAL_RE.fullmatch(n)
                if m:
                    orig = m.group(1)
                    finished.append(orig.replace(f"{TMP_DIR}:", f"{TMP_DIR}/", 1)
                                    if orig.startswith(f"{TMP_DIR}:") else orig)
        finally:
            os.close(tfd)
    return finished


class _held:
    """A DirHandle as given, or one opened for this call from a path (and closed after)."""

    def __init__(self, d: DirLike) -> None:
        self.d = d
        self.own = not isinstance(d, DirHandle)

    def __enter__(self) -> DirHandle:
        if isinstance(self.d, DirHandle):
            return self.d
        try:
            self.d = DirHandle.open(self.d)
        except CheckpointDirError as e:
            raise DeleteError(e.errno, f"{e.strerror}; nothing deleted") from None
        return self.d

    def __exit__(self, *exc) -> None:
        if self.own and isinstance(self.d, DirHandle):
            self.d.close()


def _translate(e: OSError, what: str) -> DeleteError:
    if e.errno == errno.EXDEV:
        return DeleteError(errno.EXDEV, f"{what}: a mount point is inside; not deleted (unmount it first)")
    if e.errno == errno.ELOOP:
        return DeleteError(errno.ELOOP, f"{what}: a symlink on the way; not deleted")
    return DeleteError(e.errno, f"{what}: {e.strerror or e}")


def _delete_entry(h: DirHandle, parts: list[str]) -> None:
    display = "/".join(parts)
    parent_fd = h.fd
    sub_fd = None
    try:
        if len(parts) == 2:
            try:
                sub_fd = parent_fd = h.open_beneath(parts[0])
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise FileNotFoundError(errno.ENOENT, f"{display}: already gone") from None
                raise _translate(e, display) from None
        base = parts[-1]
        try:
            st = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{display}: already gone") from None
        if stat.S_ISDIR(st.st_mode):
            _refuse_mounts(h, parent_fd, base, display)
        tfd = _open_trash(h)
        try:
            target = _move_to_trash(parent_fd, base, tfd, parts, display)
            crash_point("trash-rename")
            try:
                os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
                raise DeleteError(errno.EEXIST, f"{display}: reappeared right after it was moved away")
            except FileNotFoundError:
                pass
            try:
                _remove(h, tfd, target)
            except OSError as e:
                # The entry is out of the checkpoint dir already; its debris is reported.
                raise _translate(e, f"{display} (moved to {TRASH_DIR}/{target})") from None
        finally:
            os.close(tfd)
    finally:
        if sub_fd is not None:
            os.close(sub_fd)


def _move_to_trash(parent_fd: int, base: str, tfd: int, parts: list[str], display: str) -> str:
    """Rename the entry into the trash; its name there. "Already gone" only when the
    entry's own name is gone (ENOENT from a rename also means the trash dir itself was
    removed meanwhile); a name the trash cannot take (ENAMETOOLONG) is tried once more
    under the short name alone, and failing that is a DeleteError: a 250-byte name that
    could not be moved was recorded `deleted`."""
    # `.trainsup-tmp:step-N.pid`, or a framework's nested folder `checkpoints:checkpoint_3`
    original = parts[0] if len(parts) == 1 else f"{parts[0].replace('/', ':')}:{parts[1]}"
    target = _trash_name(original, _name_max(tfd))
    for attempt in range(2):
        try:
            os.rename(base, target, src_dir_fd=parent_fd, dst_dir_fd=tfd)
            return target
        except FileNotFoundError:
            if _gone(base, parent_fd):
                raise FileNotFoundError(errno.ENOENT, f"{display}: already gone") from None
            raise DeleteError(errno.ENOENT, f"{display}: could not be moved into {TRASH_DIR} "
                                            "(it was removed meanwhile); not deleted") from None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG and attempt == 0 and "~" in target:
                target = target.partition("~")[0]
                continue
            raise _translate(e, display) from None
    raise AssertionError("unreachable")


def _gone(name: str, dir_fd: int) -> bool:
    """The name no longer exists (ENOENT); any other answer (EACCES, ENAMETOOLONG...)
    proves nothing and is not "gone"."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return False
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _name_max(fd: int) -> int:
    try:
        return min(255, os.fpathconf(fd, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _trash_name(original: str, name_max: int = 255) -> str:
    """Short and ours; carries the original name after `~` when it fits the filesystem's
    NAME_MAX (a 250-byte name could not take a suffix)."""
    base = f"d.{time.time_ns()}.{os.getpid()}.{next(_counter)}"
    full = f"{base}~{original}"
    return full if len(os.fsencode(full)) <= name_max else base


def _refuse_mounts(h: DirHandle, parent_fd: int, name: str, display: str) -> None:
    """Walk the entry with no-crossing opens; any mount point inside refuses the entry."""
    try:
        fd = h.open_beneath(name, dir_fd=parent_fd)
    except OSError as e:
        raise _translate(e, display) from None
    stack = [(fd, name)]
    try:
        while stack:
            dfd, rel = stack.pop()
            try:
                # held dir fd: dirs opened beneath the trash dir's fd
                with os.scandir(dfd) as it:
                    subdirs = [c.name for c in it if c.is_dir(follow_symlinks=False)]
                for c in subdirs:
                    try:
                        stack.append((h.open_beneath(c, dir_fd=dfd), f"{rel}/{c}"))
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        raise _translate(e, f"{display} ({rel}/{c})") from None
            finally:
                os.close(dfd)
    finally:
        for dfd, _ in stack:
            os.close(dfd)


def open_own_dir(h: DirHandle, name: str) -> int:
    """Make (if missing) and open one of the daemon's dirs beneath the held checkpoint dir
    (the trash, the aside dir): mode 0700, owned by the checkpoint dir's owner. A root
    daemon that kept them root's left a `user:` job's own files where its user could no
    longer read, recover or delete them. A symlink or file planted under the name is never
    followed or replaced: OSError (ELOOP, ENOTDIR)."""
    try:
        os.mkdir(name, 0o700, dir_fd=h.fd)
    except FileExistsError:
        pass
    fd = h.open_beneath(name)
    try:
        st, top = os.fstat(fd), os.fstat(h.fd)
        # only what the daemon made (or an older daemon made root's) changes hands
        if st.st_uid == os.geteuid() and (st.st_uid, st.st_gid) != (top.st_uid, top.st_gid):
            try:
                os.fchown(fd, top.st_uid, top.st_gid)
            except PermissionError:
                pass             # not root: the dir stays ours, as the checkpoint dir is
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_trash(h: DirHandle) -> int:
    try:
        return open_own_dir(h, TRASH_DIR)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise DeleteError(e.errno, f"{TRASH_DIR} is not a real directory of the checkpoint dir "
                                   f"({e.strerror}); nothing deleted") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DeleteError(e.errno, f"{TRASH_DIR} is a symlink, never followed; nothing deleted "
                                       "(remove it)") from None
        raise _translate(e, TRASH_DIR) from None


def _remove(h: DirHandle, parent_fd: int, name: str) -> None:
    """Remove parent_fd/name and everything under it; never through a link or a mount."""
    # each name removed: a 100,000-file entry's deletion takes turns with other jobs' work
    budget.tick(removing=True)
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
            fd = h.open_beneath(name, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                continue  # swapped for a link or file since the lstat: look again
            raise
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue  # a different directory than the one we chose
            # held dir fd: opened beneath the held dir and checked to be the one chosen
            with os.scandir(fd) as it:
                children = [c.name for c in it]
            for c in children:
                _remove(h, fd, c)
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
