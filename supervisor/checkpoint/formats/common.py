"""What every format shares: the verdict on one checkpoint, the cache it is kept in, and
the only way a format reads a job's files — relative to a directory fd, never through a
symlink in any component, never blocking on a FIFO, regular files only."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class VerdictCache(Protocol):
    """Where verdicts survive between scans (the daemon backs it with SQLite)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, verdict_json: str) -> None: ...


class MemoryVerdictCache:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, verdict_json: str) -> None:
        self.data[key] = verdict_json


@dataclass(frozen=True)
class Verdict:
    format: str
    valid: bool
    invalid_reason: str | None = None
    step: int | None = None            # from the manifest / trainer_state, else the name
    epoch: int | None = None
    reason: str | None = None          # the manifest's save reason
    created: str | None = None         # the manifest's UTC timestamp
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    save_s: float | None = None        # the manifest's: how long the save held training up

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Verdict:
        # A verdict cached by another trainsup version may lack or add a field.
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads(s).items() if k in known})


class Invalid(Exception):
    """Internal: the first thing found wrong, worded for `trainsup checkpoints`."""


def open_under(dir_fd: int, rel: str) -> int:
    """Open `rel` below dir_fd without following a symlink in any component."""
    parts = rel.split("/")
    fd = dir_fd
    opened: list[int] = []
    try:
        for comp in parts[:-1]:
            fd = os.open(comp, NOFOLLOW_DIR, dir_fd=fd)
            opened.append(fd)
        return os.open(parts[-1], NOFOLLOW_FILE | os.O_NONBLOCK, dir_fd=fd)
    finally:
        for o in opened:
            os.close(o)


def open_regular(dir_fd: int, rel: str) -> tuple[int, os.stat_result]:
    if "\0" in rel:
        # a NUL cannot be in a real file name: os.open would raise ValueError mid-scan
        raise Invalid(f"{rel!r}: a NUL byte in a file name")
    try:
        fd = open_under(dir_fd, rel)
    except FileNotFoundError:
        raise Invalid(f"missing {rel}") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Invalid(f"{rel}: a symlink (never followed)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Invalid(f"{rel}: not a regular file")
    return fd, st


def pread_exact(fd: int, n: int, off: int) -> bytes:
    b = os.pread(fd, n, off)
    if len(b) != n:
        raise Invalid(f"short read at {off} (file changed while checking?)")
    return b


def open_entry_dir(path: str, fmt: str, step: int | None):
    """An fd on a directory checkpoint, never through a symlink; or the invalid Verdict."""
    try:
        return os.open(path, NOFOLLOW_DIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return Verdict(fmt, False, "symlink" if os.path.islink(path) else "not a directory", step)
        raise

