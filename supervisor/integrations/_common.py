"""Helpers the integrations share (no framework imported here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import contract, emergency


def under_daemon() -> bool:
    return bool(os.environ.get(contract.JOB))


def resume_env() -> str | None:
    """TRAINSUP_RESUME_FROM when set and non-empty (the daemon checked it is valid)."""
    return os.environ.get(contract.RESUME_FROM) or None


def newest_numbered(dir: Path, rx: re.Pattern, valid) -> Path | None:
    """The entry of `dir` whose name matches `rx` (group 1 = step) with the highest step
    for which valid(path) holds; a local run outside the daemon resumes from it."""
    try:
        cands = [(int(m.group(1)), dir / n) for n in os.listdir(dir) if (m := rx.match(n))]
    except (FileNotFoundError, NotADirectoryError):
        return None
    for _, p in sorted(cands, reverse=True):
        if valid(p):
            return p
    return None


def log(msg: str) -> None:
    emergency._log(msg)
