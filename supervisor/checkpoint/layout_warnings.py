"""Warnings about how a job saves, for `trainsup status` (pure: index facts in, lines out).

- A non-empty checkpoint dir where the configured format recognises nothing: the job will
  restart from scratch every time, and no quota applies to what it writes.
- Checkpoints written in place: an entry once seen valid is later seen invalid or shrunk
  (torch.save over `latest.pth`, Paddle's `latest.*`, Keras' backup). A kill in that window
  leaves no good copy under that name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import formats
from .jobfile import open_entry_dir
from .walk import listdir


def unrecognised(ckpt_dir: str | os.PathLike, fmt: str, infos: Sequence[Any]) -> str | None:
    # Entries listed only as `unmanaged` (names the format does not claim) count as nothing.
    if any(getattr(i, "managed", True) for i in infos):
        return None
    try:
        fd = open_entry_dir(os.fspath(ckpt_dir))     # never through a symlink
    except OSError:
        return None      # missing or unreadable: the scan error says so
    try:
        # names only, and few of them: this runs on the loop (a dir of 100,000 dot-names
        # is "not empty" after 1024, never a listing of all of it)
        names = [n for n, _ in listdir(fd, 1024)[0]]
    except OSError:
        return None
    finally:
        os.close(fd)
    if names and all(n.startswith(".") for n in names) and len(names) < 1024:
        return None
    if not names:
        return None
    if fmt == "auto":
        return (f"no checkpoints recognised in {ckpt_dir}: set checkpoint.format "
                f"({', '.join(formats.NAMES)})")
    return f"no {fmt} checkpoints recognised in {ckpt_dir}: check checkpoint.format and checkpoint.dir"


class InPlaceWrites:
    """Remembers each entry's last valid size; reports one rewritten in place, once seen."""

    def __init__(self) -> None:
        self.valid_bytes: dict[str, int] = {}
        self.seen: str | None = None        # the first entry caught, kept for the warning

    def observe(self, infos: Sequence[Any]) -> None:
        now: dict[str, int] = {}
        for i in infos:
            if getattr(i, "in_progress", False):
                continue
            before = self.valid_bytes.get(i.name)
            if i.valid:
                now[i.name] = i.bytes
            if before is not None and self.seen is None and (not i.valid or i.bytes < before):
                self.seen = i.name
        self.valid_bytes = now

    def warning(self) -> str | None:
        if self.seen is None:
            return None
        return (f"checkpoints written in place: {self.seen} was seen truncated or rewritten; "
                f"save to a temporary name and rename it into place (atomic), so a kill mid-save "
                f"never leaves it broken")
