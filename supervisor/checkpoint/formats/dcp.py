"""PyTorch Distributed Checkpoint (`torch.distributed.checkpoint.save` / `async_save`): a
folder per save (`checkpoint_id`, e.g. `step_100/`) holding one `__<rank>_<n>.distcp`
file per rank and writer thread and, from the coordinator, `.metadata`.

How a save commits: every rank writes its shards; then the coordinator pickles the
Metadata to `.metadata.tmp` and renames it to `.metadata`. So `.metadata` is the commit
marker: a folder without it was killed mid-save (an `async_save` killed between staging
and its background commit included), and `.metadata.tmp` says where it stopped.

What is checked, with nothing imported or executed (readers/inert_pickle.py): the
metadata parses; every item it lists (`storage_data`: file, offset, length) lies in a
regular file named there; each shard file is tiled exactly by its items, from 0 to its
size, with no gap, no overlap and nothing after (DCP writes the items of a file back to
back: a shard cut short or left from another save does not tile); every item is a
complete torch.save zip (local header first, end-of-central-directory last); and every
entry of the state dict has as many stored chunks as the metadata says it was split into
(a rank's shards missing is caught even when its files are).

Found where a save puts them: the checkpoint dir's subdirs (and one level further).
Step: the number that ends the folder's name (`step_100`, `ckpt-100`, `100`).
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from typing import Any

from .common import Invalid, Verdict
from .group import DIR, FILE, Group, Listing, Looking, Opened, join, list_dir, numbered, open_dir_under, read_small
from .readers.inert_pickle import Record, load_inert

NAME = "dcp"
KIND = "group"
COMMIT_MARKER = ".metadata"
AUTO_CLAIMS_ALL = True          # a folder is DCP's only by its `.metadata`/`.distcp` content
_SHARD_RE = re.compile(r"^__\d+_\d+\.distcp$")
_MAX_METADATA = 256 << 20
_ZIP_HEAD, _ZIP_END = b"PK\x03\x04", b"PK\x05\x06"
# Folders other formats own even when a DCP sits inside (HF Trainer with FSDP writes one
# in `checkpoint-N/pytorch_model_fsdp_0/`; trainsup's manifest lists its own files).
_OWNED_BY_OTHERS = ("trainer_state.json", "MANIFEST.json")


def is_dcp_listing(listing: Listing) -> bool:
    """Whether a folder's names say DCP wrote (or was writing) into it."""
    if any(listing.get(n) == FILE for n in _OWNED_BY_OTHERS):
        return False
    return (listing.get(COMMIT_MARKER) == FILE or listing.get(COMMIT_MARKER + ".tmp") == FILE
            or any(k == FILE and _SHARD_RE.match(n) for n, k in listing.items()))


def step_of(base: str) -> int | None:
    m = re.search(r"(\d+)$", base)
    if m is None or not (base.isdigit() or numbered(base)):
        return None
    return int(m.group(1))


def recognise(where: Looking) -> list[Group]:
    groups = []
    for name, kind in sorted(where.listing.items()):
        if kind != DIR or name.startswith("."):
            continue
        rel = join(where.dir, name)
        if is_dcp_listing(where.listing_of(rel)):
            groups.append(Group(rel, NAME, (rel,), resume=rel))
    return groups


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    base = g.name.rsplit("/", 1)[-1]
    step = step_of(base)
    try:
        _check_folder(root_fd, g.name)
    except Invalid as e:
        return Verdict(NAME, False, str(e), step)
    return Verdict(NAME, True, None, step)


def _check_folder(root_fd: int, d: str) -> None:
    try:
        data = read_small(root_fd, f"{d}/{COMMIT_MARKER}", "dcp_metadata")
    except Invalid as e:
        if not str(e).startswith("missing"):
            raise
        raise Invalid(_uncommitted(root_fd, d)) from None
    meta = load_inert(data)
    if not isinstance(meta, Record) or not meta.kind.endswith(".Metadata"):
        raise Invalid(f"{COMMIT_MARKER}: not a DCP Metadata record ({getattr(meta, 'kind', type(meta).__name__)})")
    storage = meta.field("storage_data")
    entries = meta.field("state_dict_metadata")
    if not isinstance(storage, dict) or not storage:
        raise Invalid(f"{COMMIT_MARKER}: no storage_data (a save of nothing, or not written by FileSystemWriter)")
    items = _items(storage)
    _check_chunks(entries, items)
    by_file: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    for _fqn, path, off, length, plain in items:
        by_file[path].append((off, length, plain))
    for path in sorted(by_file):
        _check_shard(root_fd, d, path, sorted(by_file[path]))


def _uncommitted(root_fd: int, d: str) -> str:
    try:
        fd = open_dir_under(root_fd, d)
    except OSError:
        return f"missing {COMMIT_MARKER} (not committed)"
    try:
        names = list_dir(fd)
    finally:
        os.close(fd)
    shards = sum(1 for n in names if _SHARD_RE.match(n))
    if COMMIT_MARKER + ".tmp" in names:
        return (f"missing {COMMIT_MARKER}, {COMMIT_MARKER}.tmp present: killed while committing "
                f"({shards} shard file(s) written)")
    return f"missing {COMMIT_MARKER} (not committed: the save was killed or is still writing; {shards} shard file(s))"


def _items(storage: dict) -> list[tuple[str, str, int, int, bool]]:
    """(fqn, file, offset, length, plain) per stored item; plain: no transform (compression...)."""
    out = []
    for index, info in storage.items():
        fqn = index.field("fqn") if isinstance(index, Record) else None
        path = info.field("relative_path") if isinstance(info, Record) else None
        off = info.field("offset") if isinstance(info, Record) else None
        length = info.field("length") if isinstance(info, Record) else None
        if not isinstance(path, str) or not isinstance(off, int) or not isinstance(length, int):
            raise Invalid(f"{COMMIT_MARKER}: a storage entry without file/offset/length ({fqn!r})")
        if "/" in path or path in ("", ".", "..") or "\0" in path:
            raise Invalid(f"{COMMIT_MARKER}: {path!r} is not a file name inside the checkpoint")
        if off < 0 or length < 0:
            raise Invalid(f"{COMMIT_MARKER}: {fqn}: negative offset or length")
        plain = not info.field("transform_descriptors")
        out.append((str(fqn), path, off, length, plain))
    return out


def _check_chunks(entries: Any, items: list[tuple[str, str, int, int, bool]]) -> None:
    if not isinstance(entries, dict):
        raise Invalid(f"{COMMIT_MARKER}: no state_dict_metadata")
    stored = Counter(fqn for fqn, *_ in items)
    for fqn, md in entries.items():
        chunks = md.field("chunks") if isinstance(md, Record) else None
        want = len(chunks) if isinstance(chunks, list) else 1
        if stored.get(str(fqn), 0) != want:
            raise Invalid(f"{COMMIT_MARKER}: {fqn} has {stored.get(str(fqn), 0)} stored chunk(s) of {want} "
                          f"(a rank's shards are missing from the metadata)")


def _check_shard(root_fd: int, d: str, name: str, ranges: list[tuple[int, int, bool]]) -> None:
    with Opened(root_fd, f"{d}/{name}") as (fd, st):
        size = st.st_size
        at = 0
        for off, length, plain in ranges:
            if off != at:
                what = "gap" if off > at else "overlap"
                raise Invalid(f"{name}: items do not tile the file ({what} at byte {min(at, off)})")
            if off + length > size:
                raise Invalid(f"{name}: an item needs bytes [{off},{off + length}), the file has {size} "
                              f"(cut short)")
            if plain and length >= 22:
                head = os.pread(fd, 4, off)
                tail = os.pread(fd, 22, off + length - 22)
                if head != _ZIP_HEAD or tail[:4] != _ZIP_END:
                    raise Invalid(f"{name}: the item at byte {off} is not a complete torch.save zip")
            at = off + length
        if at != size:
            raise Invalid(f"{name}: {size - at} bytes after the last item (another save's, or rewritten)")
