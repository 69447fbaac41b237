"""A job's checkpoint dir, resolved once and then held as a directory fd for the job's life.

Why: every path lookup is a fresh chance for a user to swap a component for a symlink
(a `run` symlink pointed at another account's run dir once made root index and delete
that account's checkpoints). So the dir is resolved once, when the config loads, with symlinks
anywhere in the path *refused* (not pinned: a pinned symlink would still let its owner
redirect the job's own saves, and the error tells the admin the real path to configure).
It is then opened once, and every later open, stat, scan, rename and unlink is relative to
that fd:

- `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` (Linux >= 5.6), through
  ctypes: the kernel refuses `..`, any symlink and any mount crossing (bind mounts on the same
  filesystem included) on every component;
- otherwise `O_NOFOLLOW` on each component and the mount id (fdinfo `mnt_id`) plus `st_dev`
  of each opened directory compared with the root's.

`check()` says whether the configured path still names the held directory; when it does
not (moved away, replaced by a symlink or another dir) the job is flagged and nothing is
deleted or offered for resume until the dir is re-resolved (a changed job file or a daemon
restart). A held dir deleted outright (st_nlink 0: nothing of it left) is re-resolved at
once by custody.py, symlinks still refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_SAFE_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = 437          # the same number on every architecture (generic syscall table)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR | os.O_NOFOLLOW


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags, mode, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{os.strerror(e)}: {path!r}")
    return fd


def _probe_openat2() -> bool:
    try:
        os.close(_openat2(-100, "/", _DIR, RESOLVE_NO_SYMLINKS))   # AT_FDCWD
        return True
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):   # old kernel, seccomp
            return False
        raise


HAVE_OPENAT2 = _probe_openat2()
# Tests flip this to exercise the per-component fallback on a kernel that has openat2.
use_openat2 = HAVE_OPENAT2


class CheckpointDirError(OSError):
    """The checkpoint dir cannot be held safely (symlinked, replaced, not a directory)."""


def mount_id(fd: int) -> int:
    """The mount an fd lives on (bind mounts of one filesystem differ here, not in st_dev)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return -1


def find_symlink(path: Path) -> tuple[Path, str] | None:
    """The first existing component of an absolute path that is a symlink, and its target."""
    cur = Path("/")
    for part in path.parts[1:]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return None
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return cur, os.readlink(cur)
    return None


@dataclass(frozen=True)
class _Identity:
    dev: int
    ino: int


class DirHandle:
    """An open checkpoint dir. Every name given to its methods is relative and beneath it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.identity = _Identity(st.st_dev, st.st_ino)
        self.mnt_id = mount_id(fd)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: os.PathLike | str, *, create: bool = False,
             create_as: tuple[int, int] | None = None) -> DirHandle:
        """Open `path` walking from `/` one component at a time, never through a symlink.

        create (or create_as): missing components are created (mkdirat, never following a
        link); create_as=(uid, gid) hands them to that owner, so a `user:` job can save into
        a dir the root daemon made for it.
        """
        create = create or create_as is not None
        p = Path(os.path.abspath(os.fspath(path)))
        fd = os.open("/", _DIR)
        try:
            for i, part in enumerate(p.parts[1:], 1):
                try:
                    nfd = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise CheckpointDirError(errno.ENOENT, f"{Path(*p.parts[:i + 1])}: does not exist") from None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        created = True
                    except FileExistsError:
                        created = False
                    nfd = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
                    if created and create_as is not None:
                        os.fchown(nfd, *create_as)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        here = Path(*p.parts[:i + 1])
                        what = (f"is a symlink to {os.readlink(here)!r}" if os.path.islink(here)
                                else "is not a directory")
                        raise CheckpointDirError(e.errno, f"{here}: {what}; checkpoint dirs are never "
                                                          "reached through symlinks") from None
                    raise
                os.close(fd)
                fd = nfd
            return cls(p, fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check(self) -> str | None:
        """None while the configured path still names the held dir; else why not."""
        try:
            other = DirHandle.open(self.path)
        except CheckpointDirError as e:
            return f"checkpoint dir replaced: {e.strerror}"
        except OSError as e:
            return f"checkpoint dir unreachable: {e.strerror or e}"
        try:
            if other.identity != self.identity:
                return f"checkpoint dir replaced: {self.path} is now another directory"
        finally:
            other.close()
        return None

    # ------------------------------------------------------------------ beneath the dir

    def open_beneath(self, rel: str, flags: int = _DIR, dir_fd: int | None = None) -> int:
        """Open rel beneath dir_fd (default: the checkpoint dir): no symlink, no `..`, no
        mount crossing, anywhere on the way."""
        base = self.fd if dir_fd is None else dir_fd
        if use_openat2:
            return _openat2(base, rel, flags | os.O_CLOEXEC, _SAFE_RESOLVE)
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise OSError(errno.EXDEV, f"{rel!r} is not beneath the checkpoint dir")
        fd = base
        opened: list[int] = []
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                fd = os.open(part, (flags if last else _DIR) | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                opened.append(fd)
                st = os.fstat(fd)
                if st.st_dev != self.identity.dev or mount_id(fd) != self.mnt_id:
                    raise OSError(errno.EXDEV, f"{rel!r}: crosses a mount point")
            return opened.pop()
        finally:
            for o in opened:
                os.close(o)

    def is_same_mount(self, fd: int) -> bool:
        st = os.fstat(fd)
        return st.st_dev == self.identity.dev and mount_id(fd) == self.mnt_id

    @property
    def io_root(self) -> str:
        """A path that reaches the held dir itself (not whatever its name now means), for
        read-only code that takes paths: the validators open everything O_NOFOLLOW below it."""
        return f"/proc/self/fd/{self.fd}"

    def __enter__(self) -> DirHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DirHandle({str(self.path)!r}, fd={self.fd})"
