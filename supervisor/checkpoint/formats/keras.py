"""Keras 3 checkpoints: `*.weights.h5`, `*.keras`, and BackupAndRestore's backup dir.

`.weights.h5` is written by h5py in place at its final name: the HDF5 superblock says
whether the writer closed it (hdf5.py). `.keras` is a zip of metadata.json, config.json
and model.weights.h5: zip checks (EOCD at the end, CRC-32 of every member), the JSON
members parse, and the inner weights were closed cleanly. BackupAndRestore overwrites
`latest.weights.h5` in place and then writes `training_metadata.json` ({"epoch": E,
"batch": B}): the metadata is the commit marker.

Step of the backup: the metadata's `step` (optimizer iterations) where the writer records
it (trainsup's TrainsupBackup does, and saves mid-epoch: an epoch count would not grow
and such a save could never confirm a request), else its epoch (epochs completed, the
count of ModelCheckpoint's 1-based `epoch{epoch:02d}` names). Beside a backup with a step,
files named by epoch (`epoch03.keras`) get epoch x the steps per epoch the backup shows,
so both count in one unit.

Keras' own BackupAndRestore loads the backup unconditionally at the start of fit(): a
backup its in-place write left broken crashes every relaunch. BROKEN_ALIAS_ASIDE lets
aside.py move such a backup aside before the relaunch (never one with a `.bkp` copy:
with double_checkpoint Keras falls back to that itself).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import replace
from typing import Any

from ..naming import counter
from .common import LIMITS, Invalid, Verdict
from .group import FILE, Group, Listing, Looking, Opened, join, read_small
from .readers.hdf5 import check_hdf5, check_hdf5_fd
from .readers.zip import check_torch_fd

WEIGHTS, MODEL = ".weights.h5", ".keras"
BACKUP_WEIGHTS, BACKUP_META = "latest.weights.h5", "training_metadata.json"
_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_EPOCH_NAMED = re.compile(r"epoch[_=-]?(\d+)", re.IGNORECASE)


NAME = "keras"
KIND = "group"
COMMIT_MARKER = BACKUP_META              # of BackupAndRestore's backup
STEM_SUFFIXES = (WEIGHTS, MODEL)


def broken_alias_aside(info: Any) -> bool:
    """An invalid backup that Keras would load at the next fit() (no `.bkp` to fall back
    to): move it aside before a relaunch, or every relaunch crashes on it."""
    return info.alias_kind == "backup" and not any(m.endswith(".bkp") for m in info.members)


def alias_rank(name: str) -> int:
    """The backup names the weights file of its step before the .keras one."""
    return 0 if name.endswith(WEIGHTS) else 1


def recognise(where: Looking) -> list[Group]:
    d, listing = where.dir, where.listing
    groups = []
    backup = listing.get(BACKUP_META) == FILE or listing.get(BACKUP_WEIGHTS) == FILE
    if backup:
        extra = [n for n in (BACKUP_WEIGHTS + ".bkp", BACKUP_META + ".bkp") if listing.get(n) == FILE]
        members = [n for n in (BACKUP_META, BACKUP_WEIGHTS) if listing.get(n) == FILE] + extra
        groups.append(Group(join(d, BACKUP_WEIGHTS), "keras", tuple(join(d, n) for n in members),
                            resume=join(d, BACKUP_WEIGHTS), alias="backup"))
    for name, kind in sorted(listing.items()):
        if kind != FILE or name.startswith(".") or (backup and name == BACKUP_WEIGHTS):
            continue
        if name.endswith((WEIGHTS, MODEL)):
            groups.append(Group(join(d, name), "keras", (join(d, name),), resume=join(d, name)))
    return groups


def step_from_name(rel: str) -> int | None:
    base = rel.rsplit("/", 1)[-1]
    stem = base[: -len(WEIGHTS)] if base.endswith(WEIGHTS) else base.rsplit(".", 1)[0]
    m = _NUMBER.search(stem)
    return int(m.group(1)) if m else None


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    if g.alias == "backup":
        return _check_backup(root_fd, g)
    step = step_from_name(g.name)
    base = g.name.rsplit("/", 1)[-1]
    try:
        with Opened(root_fd, g.name) as (fd, st):
            if base.endswith(MODEL):
                _check_keras_zip(fd, st.st_size)
            else:
                check_hdf5_fd(fd, st.st_size)
    except Invalid as e:
        return Verdict("keras", False, str(e), step)
    return Verdict("keras", True, None, step)


def _check_keras_zip(fd: int, size: int) -> None:
    check_torch_fd(fd, size)  # any zip: EOCD at the end, local headers, CRC-32 of every member
    with zipfile.ZipFile(os.fdopen(fd, "rb", closefd=False)) as zf:
        names = set(zf.namelist())
        for member in ("metadata.json", "config.json"):
            if member not in names:
                raise Invalid(f"keras: missing {member} in the archive")
            if zf.getinfo(member).file_size > LIMITS["keras_member"]:
                raise Invalid(f"keras: {member} is {zf.getinfo(member).file_size} bytes, more than "
                              f"{LIMITS['keras_member']}")
            try:
                json.loads(zf.read(member))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise Invalid(f"keras: {member} is not valid JSON ({str(e)[:200]})") from None
        if "model.weights.h5" in names:
            info = zf.getinfo("model.weights.h5")
            if info.compress_type == zipfile.ZIP_STORED:
                start = _data_start(fd, info)
                check_hdf5(lambda n, off: os.pread(fd, max(0, min(n, info.file_size - off)), start + off),
                           info.file_size)
            else:
                with zf.open(info) as m:
                    head = m.read(4096)
                check_hdf5(lambda n, off: head[off:off + n], info.file_size)


def _data_start(fd: int, info: zipfile.ZipInfo) -> int:
    hdr = os.pread(fd, 30, info.header_offset)
    nlen, xlen = int.from_bytes(hdr[26:28], "little"), int.from_bytes(hdr[28:30], "little")
    return info.header_offset + 30 + nlen + xlen


def _check_backup(root_fd: int, g: Group) -> Verdict:
    d = g.dir
    problems: list[str] = []
    step = epoch = None
    meta = join(d, BACKUP_META)
    try:
        if meta not in g.members:
            raise Invalid("missing (commit marker: BackupAndRestore writes it after the weights)")
        m = json.loads(read_small(root_fd, meta, "keras_meta") or b"null")
        if not isinstance(m, dict) or counter(m.get("epoch")) is None:
            problems.append(f"{BACKUP_META}: no epoch in 0..2**63-1")
        else:
            step = epoch = m["epoch"]
            if isinstance(m.get("step"), int) and not isinstance(m["step"], bool) and m["step"] >= 0:
                step = m["step"]
    except Invalid as e:
        problems.append(f"{BACKUP_META}: {e}")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        problems.append(f"{BACKUP_META}: not valid JSON ({str(e)[:200]})")
    weights = join(d, BACKUP_WEIGHTS)
    if weights not in g.members:
        problems.append(f"missing {BACKUP_WEIGHTS}")
    else:
        try:
            with Opened(root_fd, weights) as (fd, st):
                check_hdf5_fd(fd, st.st_size)
        except Invalid as e:
            problems.append(f"{BACKUP_WEIGHTS}: {e}")
    if problems:
        return Verdict("keras", False, "; ".join(problems), step, epoch)
    return Verdict("keras", True, None, step, epoch)


def finish(tree: Any, groups: list[Group], verdicts: dict[str, Verdict]) -> None:
    """Files named by epoch get steps in the backup's unit (optimizer iterations) where a
    backup of the same tree records both: epoch x steps per epoch."""
    per_epoch = {k for g in groups if g.alias == "backup"
                 if (k := _steps_per_epoch(tree, g, verdicts[g.name])) is not None}
    if len(per_epoch) != 1:
        return      # no backup with a step, or backups that disagree: names keep their numbers
    k = per_epoch.pop()
    for g in groups:
        v = verdicts[g.name]
        m = _EPOCH_NAMED.search(g.name.rsplit("/", 1)[-1])
        if g.alias is None and m is not None and v.step is not None:
            verdicts[g.name] = replace(v, step=int(m.group(1)) * k, epoch=int(m.group(1)))


def _steps_per_epoch(tree: Any, g: Group, v: Verdict) -> int | None:
    """(step - batch) / epoch of a valid backup whose metadata records a step."""
    if not v.valid or not v.epoch or v.step is None or v.step == v.epoch:
        return None
    try:
        m = json.loads(read_small(tree.root_fd, join(g.dir, BACKUP_META), "keras_meta"))
    except (Invalid, OSError, ValueError, UnicodeDecodeError):
        return None
    batch = m.get("batch", 0) if isinstance(m, dict) else None
    if not isinstance(batch, int) or isinstance(batch, bool) or m.get("step") != v.step:
        return None
    done = v.step - batch
    return done // v.epoch if done > 0 and done % v.epoch == 0 else None
