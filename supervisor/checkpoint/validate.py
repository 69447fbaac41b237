"""The verdict on one entry of a checkpoint dir whose format is an entry format
(formats/: trainsup, torch, hf): which format a name belongs to, the entry's fingerprint,
and its verdict — from the cache when nothing changed.

Structure, sizes and hashes only: nothing here unpickles, imports torch or executes
anything from a checkpoint (torch.load, even weights_only=True, has had code-execution
bugs). Symlinks are never followed: files are opened relative to directory descriptors
with O_NOFOLLOW.

Verdicts are cached by a fingerprint of every file involved: (st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns, mode) from lstat, so confirming an already verified checkpoint
costs a directory walk of lstat calls and no reads. ctime is included because mtime can be
set back by anyone with `touch -d`; ctime cannot.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

import xxhash

from . import formats, naming
from .formats.common import Verdict, VerdictCache
from .formats.groups import checked
from .jobfile import Invalid, open_entry_dir
from .settle import settle
from .walk import TooLarge, walk

_CACHE_VERSION = "v2"


# ---------------------------------------------------------------- recognising entries

def detect_format(name: str, is_dir: bool, fmt: str = "auto", pattern=None) -> str | None:
    """The format an entry of a checkpoint dir is checked with, from its name and kind
    alone; None for a name the format does not claim (unmanaged: never deleted)."""
    if fmt not in formats.CHOICES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(formats.CHOICES)}")
    return formats.managed_format(name, is_dir, fmt, pattern)


def name_format(name: str, fmt: str = "auto", pattern=None) -> str | None:
    """Like detect_format for an entry whose kind must not be trusted (a symlink)."""
    return detect_format(name, True, fmt, pattern) or detect_format(name, False, fmt, pattern)


def step_from_name(name: str) -> int | None:
    return naming.step_of(name)


# ---------------------------------------------------------------- fingerprints

class TooManyFiles(Exception):
    """fingerprint() met more files than its caller allowed (not an OSError: nothing is
    wrong with the entry, the caller only must not pay for it here)."""


def fingerprint(path: str, limit: int | None = None) -> tuple[str, int, float]:
    """(digest, total bytes, newest mtime) of an entry from lstat calls only, walked
    through dir fds within walk.py's bounds (TooLarge past them). With `limit`, raises
    TooManyFiles past that many names or any walk bound (the daemon's loop scans inline
    only what stays cheap: an entry of 20,000 files cost it 330 ms)."""
    h = xxhash.xxh3_128()
    total = 0
    newest = 0.0

    def add(rel: str, st: os.stat_result) -> None:
        nonlocal total, newest
        h.update(
            f"{rel}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0"
            f"{st.st_ctime_ns}\0{st.st_mode}\n".encode("utf-8", "surrogateescape")
        )
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        newest = max(newest, st.st_mtime)

    st = os.lstat(path)
    add("", st)
    if stat.S_ISDIR(st.st_mode):
        try:
            fd = open_entry_dir(path)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):     # swapped for a link or a file
                raise FileNotFoundError(errno.ENOENT, f"{path}: replaced while looked at") from None
            raise
        try:
            if limit is None:
                for rel, est in walk(fd):
                    add(rel, est)
            else:
                try:
                    for rel, est in walk(fd, names=limit, per_dir=limit):
                        add(rel, est)
                except TooLarge:
                    raise TooManyFiles(f"{path}: more than {limit} files") from None
        finally:
            os.close(fd)
    return h.hexdigest(), total, newest


# ---------------------------------------------------------------- entry point

@dataclass(frozen=True)
class EntryCheck:
    verdict: Verdict
    bytes: int
    mtime: float          # newest mtime of the entry or anything in it
    cached: bool
    fingerprint: str = ""  # lstat digest of every file: what the liveness tracker compares


def check_entry(path: str, fmt: str, cache: VerdictCache | None = None,
                key_path: str | None = None) -> EntryCheck:
    """Verdict for one entry of a known format, from the cache when nothing changed.

    key_path: the entry's stable name for the cache when `path` reaches it through a
    held fd (/proc/self/fd/N/...). Raises FileNotFoundError if the entry vanished before
    it could be looked at.
    """
    path = os.fspath(path)
    step = step_from_name(os.path.basename(path))
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return EntryCheck(Verdict(fmt, False, "symlink", step), 0, st.st_mtime, False)
    try:
        # a cache view may bound the walk (daemon/checkpoints.py _CachedOnly: the loop's inline scans)
        fp, total, newest = fingerprint(path, getattr(cache, "fingerprint_limit", None))
    except Invalid as e:
        # past a walk bound: that entry's verdict (unsupported: never deleted, never
        # offered), fingerprinted by its top alone
        top = f"big:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        return EntryCheck(Verdict(fmt, False, str(e), step), 0, st.st_mtime, False, top)
    # One cache row per entry (its fingerprint inside): an entry changed a thousand
    # times is one row, not a thousand.
    key = f"{_CACHE_VERSION}|{fmt}|{key_path or os.path.abspath(path)}"
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            have_fp, _, verdict_json = hit.partition("\n")
            if have_fp == fp:
                try:
                    return EntryCheck(Verdict.from_json(verdict_json), total, newest, True, fp)
                except (ValueError, TypeError):
                    pass  # a cache row from another version: recompute
    try:
        # No dirty page may outlive the verdict: a later write through a shared mapping
        # must fault and move ctime, so the fingerprint sees it (reprove.py).
        settle(path)
        verdict = checked(fmt, path, lambda: formats.FORMATS[fmt].check(path), step)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        # EIO, EACCES, EMFILE...: report, and do not cache a verdict that may be transient.
        return EntryCheck(Verdict(fmt, False, f"unreadable: {e.strerror or e}", step), total, newest, False, fp)
    if verdict is None:
        return EntryCheck(Verdict(fmt, False, "unreadable: internal error (logged)", step), total, newest, False, fp)
    if cache is not None:
        # Only cache what was checked against a tree that did not move underneath us.
        try:
            if fingerprint(path)[0] == fp:
                cache.put(key, f"{fp}\n{verdict.to_json()}")
        except (OSError, Invalid):
            pass
    return EntryCheck(verdict, total, newest, False, fp)
