"""Orbax `CheckpointManager` step folders (JAX): `<dir>/<step>/` (or `<prefix>_<step>/` with
`step_prefix`), each holding `_CHECKPOINT_METADATA` (JSON), one folder per item
(`default/`, or the names given to `Composite`) and `commit_success.txt`.

How a save commits: everything is written into `<step>.orbax-checkpoint-tmp-<n>/`; the
finalize step records `commit_timestamp_nsecs` in `_CHECKPOINT_METADATA`, writes
`commit_success.txt`, and renames the folder to `<step>/` (on filesystems without an
atomic rename it writes into `<step>/` and `commit_success.txt` last). So a tmp folder is a
save killed or in progress, never offered; a step folder needs `commit_success.txt` and a
commit timestamp.

What else is checked: every item the metadata lists has its folder with a `_METADATA`
that parses; every OCDBT manifest (`manifest.ocdbt`, `ocdbt.process_N/manifest.ocdbt`)
and every B-tree/data file that carries OCDBT's framing (magic, length, CRC32C) ends where
its length says and matches its CRC32C (raw value files carry no checksum: sizes only).
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

from .common import Invalid, Verdict
from .group import DIR, FILE, Group, Listing, Looking, Opened, join, list_dir, open_dir_under, read_small

NAME = "orbax"
KIND = "group"
COMMIT_MARKER = "commit_success.txt"
AUTO_CLAIMS_ALL = True          # a folder is Orbax's only by its _CHECKPOINT_METADATA or tmp name
METADATA = "_CHECKPOINT_METADATA"
TMP = ".orbax-checkpoint-tmp"
_STEP_RE = re.compile(r"(\d+)$")
_TMP_RE = re.compile(r"^(?:.*?)(\d+)" + re.escape(TMP) + r"(?:-\d+)?$")
_MAGICS = (0x0CDB3A2A, 0x0CDB20DE)          # OCDBT manifest, B-tree node
_MAX_JSON = 16 << 20
_MAX_FRAMED = 256 << 20


def skips_dir(name: str) -> bool:
    return TMP in name          # an entry of its own (a save in progress), not a folder of entries


def recognise(where: Looking) -> list[Group]:
    out = []
    for name, kind in sorted(where.listing.items()):
        if kind != DIR or name.startswith("."):
            continue
        rel = join(where.dir, name)
        if TMP in name and _TMP_RE.match(name) or where.listing_of(rel).get(METADATA) == FILE:
            out.append(Group(rel, NAME, (rel,), resume=rel))
    return out


def step_of(base: str) -> int | None:
    m = _TMP_RE.match(base) or _STEP_RE.search(base)
    return int(m.group(1)) if m else None


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    base = g.name.rsplit("/", 1)[-1]
    step = step_of(base)
    if TMP in base:
        return Verdict(NAME, False, "an Orbax tmp folder: the save was killed or is still writing "
                                    "(committed by its rename to the step's name)", step)
    try:
        _check_step(root_fd, g.name)
    except Invalid as e:
        return Verdict(NAME, False, str(e), step)
    return Verdict(NAME, True, None, step)


def _names(root_fd: int, d: str) -> Listing:
    fd = open_dir_under(root_fd, d)
    try:
        return list_dir(fd)
    finally:
        os.close(fd)


def _json(root_fd: int, rel: str) -> Any:
    try:
        return json.loads(read_small(root_fd, rel, "orbax_json"))
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"{rel.rsplit('/', 1)[-1]}: not valid JSON ({e})") from None


def _check_step(root_fd: int, d: str) -> None:
    names = _names(root_fd, d)
    if names.get(COMMIT_MARKER) != FILE:
        raise Invalid(f"missing {COMMIT_MARKER} (the save never finalized)")
    meta = _json(root_fd, f"{d}/{METADATA}")
    if not isinstance(meta, dict) or not isinstance(meta.get("commit_timestamp_nsecs"), int):
        raise Invalid(f"{METADATA}: no commit_timestamp_nsecs (the save never finalized)")
    items = meta.get("item_handlers")
    wanted = sorted(items) if isinstance(items, dict) else [n for n, k in names.items() if k == DIR]
    for item in wanted:
        if not isinstance(item, str) or "/" in item or item in ("", ".", ".."):
            raise Invalid(f"{METADATA}: {item!r} is not an item folder name")
        if names.get(item) != DIR:
            raise Invalid(f"missing the item folder {item}/ that {METADATA} lists")
        _check_item(root_fd, f"{d}/{item}", item)


def _check_item(root_fd: int, d: str, item: str) -> None:
    names = _names(root_fd, d)
    if names.get("_METADATA") == FILE:
        _json(root_fd, f"{d}/_METADATA")
    stack = [d]
    while stack:
        cur = stack.pop()
        for n, k in sorted(_names(root_fd, cur).items()):
            rel = f"{cur}/{n}"
            if k == DIR:
                stack.append(rel)
            elif k == FILE and (n == "manifest.ocdbt" or cur.endswith("/d")):
                _check_framed(root_fd, rel, rel[len(d) - len(item):], required=n == "manifest.ocdbt")


def _check_framed(root_fd: int, rel: str, shown: str, required: bool) -> None:
    """An OCDBT manifest or B-tree node: magic (big-endian), total length (little-endian
    u64), ..., CRC32C (little-endian) of everything before it."""
    with Opened(root_fd, rel) as (fd, st):
        if st.st_size < 16:
            if required or st.st_size == 0:
                raise Invalid(f"{shown}: {st.st_size} bytes (cut short)")
            return
        head = os.pread(fd, 12, 0)
        (magic,) = struct.unpack(">I", head[:4])
        if magic not in _MAGICS:
            if required:
                raise Invalid(f"{shown}: not an OCDBT manifest (magic 0x{magic:08x})")
            return          # raw value bytes: nothing to check them against
        (length,) = struct.unpack("<Q", head[4:12])
        if length > st.st_size or length < 16:
            raise Invalid(f"{shown}: says {length} bytes, the file has {st.st_size} (cut short)")
        if length > _MAX_FRAMED:
            return
        data = os.pread(fd, length, 0)
        if len(data) != length:
            raise Invalid(f"{shown}: short read (file changed while checking?)")
    import crc32c  # at the first Orbax check: 3 MB of RSS most daemons never use

    (stored,) = struct.unpack("<I", data[-4:])
    if crc32c.crc32c(data[:-4]) != stored:
        raise Invalid(f"{shown}: CRC32C mismatch (content corrupt or rewritten)")
