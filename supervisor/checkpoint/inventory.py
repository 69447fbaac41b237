"""What was in a job's checkpoint dir before its first launch: never the job's to delete.

Recorded once, durably, as a small JSON file in the daemon's state dir
(`<state_dir>/checkpoint-inventory/<job>.json`: the dir's (dev, ino) and each entry's name
and inode), written atomically (tmp, fsync, rename, fsync dir) before the first launch.
A file (not the state DB) so the record survives a state DB moved aside as corrupt, and so
an admin can read or delete it. An entry listed there with the same inode is
`preexisting` for rotation unless `checkpoint.pattern` claims its name; a name the job
later replaced by a new file (new inode) is the job's own.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .dirhandle import DirHandle
from .format import TMP_DIR
from .index import CheckpointInfo

_SUBDIR = "checkpoint-inventory"


def _file(state_dir: Path, job: str) -> Path:
    return Path(state_dir) / _SUBDIR / f"{job}.json"


def load(state_dir: Path, job: str) -> dict | None:
    try:
        # not a job path: the daemon's state dir
        data = json.loads(_file(state_dir, job).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else None


def record_first_launch(state_dir: Path, job: str, h: DirHandle | None, where: Path) -> dict:
    """The inventory for this job and dir: the one on file if it is of this very dir,
    else what is there now (written before returning). A dir that does not exist yet at
    the first launch held nothing: that is recorded too (identity filled in once the dir
    appears), so the job's own later saves are never taken for pre-existing files."""
    have = load(state_dir, job)
    if h is None:
        if have is not None:
            return have
        return _write(state_dir, job, {"dir": str(where), "dev": None, "ino": None, "entries": {}})
    st = os.fstat(h.fd)
    if have is not None and (have.get("dev"), have.get("ino")) == (st.st_dev, st.st_ino):
        return have
    if have is not None and have.get("dev") is None:
        return _write(state_dir, job, {**have, "dev": st.st_dev, "ino": st.st_ino})
    entries = {}
    # held dir fd: the checkpoint dir's top level (names only)
    with os.scandir(h.fd) as it:
        for e in it:
            if e.name in (TMP_DIR, ".trainsup-trash"):
                continue
            try:
                entries[e.name] = e.inode()
            except OSError:
                continue
    return _write(state_dir, job, {"dir": str(h.path), "dev": st.st_dev, "ino": st.st_ino, "entries": entries})


def _write(state_dir: Path, job: str, data: dict) -> dict:
    path = _file(state_dir, job)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # not a job path: the daemon's state dir
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # not a job path: the daemon's state dir
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return data


def preexisting(infos: Iterable[CheckpointInfo], inventory: dict | None,
                pattern: re.Pattern | None = None) -> set[str]:
    """Names rotation must leave alone because they predate the job (and `pattern`
    does not claim them)."""
    if not inventory:
        return set()
    entries = inventory.get("entries", {})
    out = set()
    for i in infos:
        if i.in_progress or i.name not in entries:
            continue
        if pattern is not None and pattern.fullmatch(i.name):
            continue
        if not i.ino or entries[i.name] == i.ino:
            out.add(i.name)
    return out
