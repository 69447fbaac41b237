"""The one way the daemon opens a job's file.

A job controls every byte and every name below its checkpoint dir, and one daemon serves
every job of every user. So a file of a job is opened only here:

- relative to a directory fd the daemon holds (the job's DirHandle, or a dir opened from
  it), with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV): no symlink,
  no `..`, no mount crossing (a user's FUSE mount could make a read wait forever) in any
  component; O_NOFOLLOW on each component where the kernel has no openat2;
- O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, then fstat: anything but a regular file
  (a FIFO, a socket, a device) is a verdict, "not a regular file", never a wait. Found: a
  FIFO swapped in for an HF trainer_state.json blocked the event loop forever, and a FIFO
  named like TF's state file held the daemon-wide rotation lock;
- small files (JSON, state files, pickled counters) are read whole only under a cap per
  kind (LIMITS, documented in the README): a 120 MB manifest once grew the daemon to 1.3 GiB;
- each file opened adds what it really holds to the current verdict's read budget
  (budget.py): a sparse file's holes are never read.

tests/unit/test_jobfile_only.py fails the build when checkpoint/ or daemon/ opens a path
any other way (outside the lines that say why a path is not a job's).
"""

from __future__ import annotations

import errno
import os
import stat

from . import budget

FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# What each kind of small file may weigh; past it, the file is a verdict, not a read.
LIMITS: dict[str, int] = {
    "manifest": 4 << 20,           # trainsup MANIFEST.json: about 50,000 files
    "tf_state": 1 << 20,           # TF's `checkpoint` state file: one line per kept save
    "trainer_state": 16 << 20,     # HF trainer_state.json (its log_history grows with the run)
    "lightning_state": 4 << 20,    # a Lightning .ckpt's data.pkl (global_step, callback state)
    "paddle_states": 1 << 20,      # Paddle .states / .pdstates: a dict of numbers
    "keras_meta": 1 << 20,         # Keras BackupAndRestore's training_metadata.json
    "keras_member": 16 << 20,      # metadata.json / config.json inside a .keras zip
    "safetensors_header": 8 << 20,  # a safetensors file's JSON header
    "tf_index": 16 << 20,          # a TF bundle's .index (an SSTable of tensor entries)
    "dcp_metadata": 256 << 20,     # torch DCP's .metadata: one entry per chunk of every tensor
    "deepspeed_latest": 4096,      # DeepSpeed's `latest`: one tag
    "orbax_json": 16 << 20,        # Orbax's _CHECKPOINT_METADATA, _METADATA, OCDBT manifests
}


class Invalid(Exception):
    """The first thing found wrong, worded for `trainsup checkpoints` (formats' verdicts)."""


def _open_beneath(dir_fd: int, rel: str, flags: int) -> int:
    if "\0" in rel:
        # a NUL cannot be in a real file name: os.open would raise ValueError mid-scan
        raise Invalid(f"{rel!r}: a NUL byte in a file name")
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise Invalid(f"{rel!r}: not a name beneath the checkpoint")
    # (imported here: in-job code reads LIMITS and needs no ctypes)
    from . import dirhandle as dh
    if dh.use_openat2:       # tests flip it to exercise the per-component fallback
        return dh._openat2(dir_fd, rel, flags, dh.RESOLVE_BENEATH | dh.RESOLVE_NO_SYMLINKS
                           | dh.RESOLVE_NO_XDEV | dh.RESOLVE_NO_MAGICLINKS)
    # per component: O_NOFOLLOW everywhere, and the same mount as the dir we start from
    dev, mnt = os.fstat(dir_fd).st_dev, dh.mount_id(dir_fd)
    fd = dir_fd
    opened: list[int] = []
    try:
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            fd = os.open(comp, flags if last else DIR_FLAGS, dir_fd=fd)
            opened.append(fd)
            if os.fstat(fd).st_dev != dev or dh.mount_id(fd) != mnt:
                raise OSError(errno.EXDEV, f"{rel!r}: crosses a mount point")
        return opened.pop()
    finally:
        for o in opened:
            os.close(o)


def _refused(rel: str, e: OSError) -> Invalid | None:
    if e.errno == errno.ENOENT:
        return Invalid(f"missing {rel}")
    if e.errno == errno.ELOOP:
        return Invalid(f"{rel}: a symlink (never followed)")
    if e.errno == errno.ENOTDIR:
        return Invalid(f"{rel}: a path component is not a directory (or a symlink: never followed)")
    if e.errno == errno.EXDEV:
        return Invalid(f"{rel}: crosses a mount point (never followed)")
    if e.errno in (errno.ENXIO, errno.EOPNOTSUPP):       # a socket; a device with no driver
        return Invalid(f"{rel}: not a regular file")
    return None


def allocated(fd: int, st: os.stat_result) -> int:
    """Bytes of the file that hold data, not holes (what a read of it may cost).

    st_blocks first (one fstat: the dense case); where blocks are fewer than the size,
    SEEK_DATA/SEEK_HOLE tell holes from data compressed on disk (btrfs, ZFS)."""
    size = st.st_size
    if st.st_blocks * 512 >= size:
        return size
    data, off = 0, 0
    try:
        for _ in range(4096):           # extents looked at; past that, the blocks count
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # nothing but a hole from here on
                    return data
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            data += end - start
            off = end
            if off >= size:
                return data
    except (OSError, AttributeError):
        pass
    return max(data, st.st_blocks * 512)


def open_file(dir_fd: int, rel: str) -> tuple[int, os.stat_result]:
    """A job's regular file below dir_fd, opened for reading without a wait; Invalid when
    it is missing, a symlink, behind a mount, or not a regular file. OSError (EACCES, EIO,
    EMFILE) means the file could not be looked at."""
    try:
        fd = _open_beneath(dir_fd, rel, FILE_FLAGS)
    except OSError as e:
        inv = _refused(rel, e)
        if inv is not None:
            raise inv from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"{rel}: not a regular file")
        b = budget.current()
        if b is not None:
            b.allow((st.st_dev, st.st_ino), allocated(fd, st), rel, st.st_size)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_dir(dir_fd: int, rel: str) -> int:
    """A directory below dir_fd (rel "" or "." : a new fd on dir_fd itself); OSError as is
    (ELOOP: a symlink, ENOTDIR: not a directory, EXDEV: a mount)."""
    if rel in ("", "."):
        return os.dup(dir_fd)
    return _open_beneath(dir_fd, rel.strip("/"), DIR_FLAGS)


def open_entry_dir(path: str) -> int:
    """An fd on a directory entry named by a path through the held dir
    (`/proc/self/fd/N/<name>`: the kernel follows only its own link to the held dir)."""
    return os.open(path, DIR_FLAGS)


def open_entry_file(path: str) -> tuple[int, os.stat_result]:
    """open_file for a file entry named by a path through the held dir
    (`/proc/self/fd/N/<name>`), relative to the dir the path names."""
    parent, _, name = path.rpartition("/")
    dfd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_file(dfd, name)
    finally:
        os.close(dfd)


def pread_exact(fd: int, n: int, off: int) -> bytes:
    b = os.pread(fd, n, off)
    budget.slow_read(len(b))
    budget.tick(len(b))
    if len(b) != n:
        raise Invalid(f"short read at {off} (file changed while checking?)")
    return b


def read_capped(dir_fd: int, rel: str, kind: str) -> bytes:
    """The whole of a small file of a job; Invalid when it is larger than its kind may be."""
    limit = LIMITS[kind]
    fd, st = open_file(dir_fd, rel)
    try:
        if st.st_size > limit:
            raise Invalid(f"{rel}: {st.st_size} bytes, more than the {limit} a {kind.replace('_', ' ')} "
                          f"may have")
        data = os.pread(fd, st.st_size, 0)
        budget.slow_read(len(data))
        budget.tick(len(data))
        if len(data) != st.st_size:
            raise Invalid(f"{rel}: short read (file changed while checking?)")
        return data
    finally:
        os.close(fd)


def read_capped_fd(fd: int, size: int, rel: str, kind: str) -> bytes:
    """Like read_capped, for a file already opened through open_file."""
    limit = LIMITS[kind]
    if size > limit:
        raise Invalid(f"{rel}: {size} bytes, more than the {limit} a {kind.replace('_', ' ')} may have")
    return pread_exact(fd, size, 0)


def create_exclusive(dir_fd: int, name: str, mode: int = 0o644, read_back: bool = False) -> int:
    """A new file of the daemon's own next to a job's files (a temp file): created, never
    opened if anything already has the name (a planted FIFO would block a write).
    read_back: opened for reading too (a download hashed before it is renamed in)."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a plain name")
    return os.open(name, (os.O_RDWR if read_back else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
                   | os.O_CLOEXEC | os.O_NOCTTY, mode, dir_fd=dir_fd)
