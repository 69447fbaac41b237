"""What a framework checkpoint is on disk: one or more files that live and die together.

A `Group` names the files (members) of one checkpoint relative to the checkpoint dir, the
files outside it that decide its verdict (markers: TF's `checkpoint` state file), the path
the framework's resume call takes, and, for names a framework overwrites or links
(`latest`, `last.ckpt`, BackupAndRestore's backup), which kind of alias it is.

Everything below reads through directory fds with O_NOFOLLOW on every component: a
symlink swapped in anywhere is reported, never followed.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from .common import NOFOLLOW_DIR, Invalid, open_regular

# kinds in a listing
FILE, DIR, LINK = "f", "d", "l"
Listing = dict  # name -> kind (FILE | DIR | LINK)


@dataclass(frozen=True)
class Group:
    name: str                          # relative to the checkpoint dir, posix: "latest", "ckpt-3"
    format: str
    members: tuple[str, ...]           # what the checkpoint is made of; commit marker first
    resume: str                        # relative path the framework's resume call takes
    markers: tuple[str, ...] = ()      # files outside the entry that its verdict depends on
    alias: str | None = None        # latest | best | last | backup: a name the framework rewrites
    link_to: str | None = None      # save_last="link": the sibling a symlink names

    @property
    def dir(self) -> str:
        return self.name.rsplit("/", 1)[0] if "/" in self.name else ""


@dataclass(frozen=True)
class Looking:
    """What a group format is shown of one dir it may find checkpoints in."""
    dir: str                                   # relative to the checkpoint dir ("" = the dir itself)
    listing: Listing
    explicit: bool                             # the job named this format (not `auto`)
    lightning_dir: bool                        # a Lightning `.../checkpoints` dir
    readlink: Callable[[str], str | None]      # a symlink's target, read beneath the root


# A step or epoch number set off by a step word or a separator (`iter_epoch_3`, `epoch03`,
# `ckpt-12`, `model-00100`); not one glued to a word (`resnet50`: a model name).
_NUMBERED = re.compile(r"(?:(?:step|epoch|iter|iteration|ckpt|checkpoint)[_=-]?|[_=-])\d+", re.IGNORECASE)
_SHARD = re.compile(r"-\d+-of-\d+$")


def numbered(stem: str) -> bool:
    """Whether a name numbers a save (so `auto` may claim it; exports like `final.keras`,
    `model.safetensors` or `model-00001-of-00002` shards are the user's, never rotated)."""
    return bool(_NUMBERED.search(stem)) and not _SHARD.search(stem) and stem[-1:].isdigit()


def join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def list_dir(dir_fd: int) -> Listing:
    out: Listing = {}
    with os.scandir(dir_fd) as it:
        for e in it:
            try:
                if e.is_symlink():
                    out[e.name] = LINK
                elif e.is_dir(follow_symlinks=False):
                    out[e.name] = DIR
                elif e.is_file(follow_symlinks=False):
                    out[e.name] = FILE
            except FileNotFoundError:
                continue
    return out


def open_dir_under(root_fd: int, rel: str) -> int:
    """An fd on root/rel, refusing a symlink in any component."""
    fd = root_fd
    opened: list[int] = []
    try:
        for comp in [c for c in rel.split("/") if c]:
            fd = os.open(comp, NOFOLLOW_DIR, dir_fd=fd)
            opened.append(fd)
    except BaseException:
        for o in opened:
            os.close(o)
        raise
    for o in opened[:-1]:
        os.close(o)
    return opened[-1] if opened else os.dup(root_fd)


def lstat_under(root_fd: int, rel: str) -> os.stat_result | None:
    """lstat of root/rel through O_NOFOLLOW dirs; None if it is not there."""
    d, _, base = rel.rpartition("/")
    try:
        dfd = open_dir_under(root_fd, d)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise
    try:
        return os.lstat(base, dir_fd=dfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)


def fingerprint(root_fd: int, rels: tuple[str, ...]) -> tuple[str, int, float, bool]:
    """(digest, regular bytes, newest mtime, all present) from lstat calls only."""
    h = xxhash.xxh3_128()
    total, newest, present = 0, 0.0, True
    for rel in rels:
        st = lstat_under(root_fd, rel)
        if st is None:
            present = False
            h.update(f"{rel}\0-\n".encode("utf-8", "surrogateescape"))
            continue
        h.update(f"{rel}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0"
                 f"{st.st_ctime_ns}\0{st.st_mode}\n".encode("utf-8", "surrogateescape"))
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        elif stat.S_ISDIR(st.st_mode):
            total += _dir_bytes(root_fd, rel)
        newest = max(newest, st.st_mtime)
    return h.hexdigest(), total, newest, present


def _dir_bytes(root_fd: int, rel: str) -> int:
    try:
        dfd = open_dir_under(root_fd, rel)
    except OSError:
        return 0
    total = 0
    try:
        with os.scandir(dfd) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
    finally:
        os.close(dfd)
    return total


class Opened:
    """`with Opened(root_fd, rel) as (fd, st):` a regular file below root, or Invalid."""

    def __init__(self, root_fd: int, rel: str) -> None:
        self.root_fd, self.rel = root_fd, rel
        self.fd = -1

    def __enter__(self) -> tuple[int, os.stat_result]:
        self.fd, st = open_regular(self.root_fd, self.rel)
        return self.fd, st

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def read_small(root_fd: int, rel: str, limit: int = 1 << 20) -> bytes:
    """The bytes of a small file (JSON metadata, a state file); Invalid if larger than limit."""
    with Opened(root_fd, rel) as (fd, st):
        if st.st_size > limit:
            raise Invalid(f"{rel}: {st.st_size} bytes, more than the {limit} expected")
        data = os.pread(fd, st.st_size, 0)
        if len(data) != st.st_size:
            raise Invalid(f"{rel}: short read (file changed while checking?)")
        return data
