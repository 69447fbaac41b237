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

from ..jobfile import open_dir, open_file, read_capped
from ..walk import MAX_DEPTH, MAX_ENTRY_NAMES, listdir

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
    # another dir's listing (read once per scan): formats whose checkpoint is a folder
    # known by what is in it (DCP's `.metadata`, DeepSpeed's `mp_rank_*`) look inside
    listing_of: Callable[[str], Listing] = lambda rel: {}


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
    """Kinds of a dir's names, up to walk.MAX_DIR_NAMES of them (a dir of more is looked
    at in part: a 100,000-name dir cost every scan its whole listing)."""
    out: Listing = {}
    for name, st in listdir(dir_fd)[0]:
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode):
            out[name] = LINK
        elif stat.S_ISDIR(st.st_mode):
            out[name] = DIR
        elif stat.S_ISREG(st.st_mode):
            out[name] = FILE
    return out


def open_dir_under(root_fd: int, rel: str) -> int:
    """An fd on root/rel: no symlink, no mount crossing in any component."""
    return open_dir(root_fd, "/".join(c for c in rel.split("/") if c))


def lstat_under(root_fd: int, rel: str) -> os.stat_result | None:
    """lstat of root/rel through O_NOFOLLOW dirs; None if it is not there."""
    d, _, base = rel.rpartition("/")
    try:
        dfd = open_dir_under(root_fd, d)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EXDEV):
            return None
        raise
    try:
        return os.lstat(base, dir_fd=dfd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dfd)


def fingerprint(root_fd: int, rels: tuple[str, ...]) -> tuple[str, int, float, bool]:
    """(digest, regular bytes, newest mtime, all present) from lstat calls only. A member
    that is a dir (a DCP or DeepSpeed step folder) counts every file beneath it: a shard
    truncated in place moves no dir mtime, and must still move the digest."""
    h = xxhash.xxh3_128()
    total, newest, present = 0, 0.0, True
    for rel in rels:
        st = lstat_under(root_fd, rel)
        if st is None:
            present = False
            h.update(f"{rel}\0-\n".encode("utf-8", "surrogateescape"))
            continue
        inside = _tree_stats(root_fd, rel) if stat.S_ISDIR(st.st_mode) else []
        for r, s in [(rel, st), *inside]:
            h.update(f"{r}\0{s.st_dev}\0{s.st_ino}\0{s.st_size}\0{s.st_mtime_ns}\0"
                     f"{s.st_ctime_ns}\0{s.st_mode}\n".encode("utf-8", "surrogateescape"))
            if stat.S_ISREG(s.st_mode):
                total += s.st_size
            newest = max(newest, s.st_mtime)
    return h.hexdigest(), total, newest, present


def _tree_stats(root_fd: int, rel: str) -> list[tuple[str, os.stat_result]]:
    """(path, lstat) of everything beneath the dir root/rel, sorted, never through a
    symlink; bounded like every walk of a job's files (walk.py)."""
    out: list[tuple[str, os.stat_result]] = []
    stack = [(rel, 0)]
    while stack and len(out) < MAX_ENTRY_NAMES:
        d, depth = stack.pop()
        try:
            dfd = open_dir_under(root_fd, d)
        except OSError:
            continue
        try:
            listing = listdir(dfd, MAX_ENTRY_NAMES - len(out))[0]
        finally:
            os.close(dfd)
        for name, st in listing:
            if st is None:
                continue
            out.append((f"{d}/{name}", st))
            if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                stack.append((f"{d}/{name}", depth + 1))
    out.sort(key=lambda t: t[0])
    return out


class Opened:
    """`with Opened(root_fd, rel) as (fd, st):` a regular file below root, or Invalid."""

    def __init__(self, root_fd: int, rel: str) -> None:
        self.root_fd, self.rel = root_fd, rel
        self.fd = -1

    def __enter__(self) -> tuple[int, os.stat_result]:
        self.fd, st = open_file(self.root_fd, self.rel)
        return self.fd, st

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def read_small(root_fd: int, rel: str, kind: str) -> bytes:
    """The bytes of a small file of a job (JSON metadata, a state file): Invalid past the
    cap of its kind (jobfile.LIMITS)."""
    return read_capped(root_fd, rel, kind)
