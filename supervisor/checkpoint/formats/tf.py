"""TensorFlow checkpoints: `<prefix>.index` + `<prefix>.data-NNNNN-of-NNNNN` as one entry.

tf.train.Checkpoint stages a save in `<prefix>_temp/`, renames the data shard into place,
writes `<prefix>.index` in place, removes the temp dir, and then CheckpointManager rewrites
the `checkpoint` state file (tmp + rename): that state file is the commit marker. A prefix
it does not list is not committed; a leftover `*_temp/` is a save in progress or killed.

The index is a LevelDB SSTable: a 48-byte footer (two block handles and a magic number),
blocks with a 5-byte trailer (compression type + masked CRC32C). Its entries map tensor
names to BundleEntryProto (dtype, shape, shard_id, offset, size, masked CRC32C of the
bytes); key "" holds the BundleHeaderProto (num_shards). Every tensor must lie inside its
shard, match its CRC32C, and the shard must end where its last tensor ends.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..range_reader import ShortRead, checksum_ranges
from .common import LIMITS, Invalid, Verdict
from .group import DIR, FILE, Group, Listing, Looking, Opened, join, read_small
from .tf_state import STATE_FILE, forget_in_tf_state, forget_missing, write_state_if_absent

_DATA_RE = re.compile(r"^(.+)\.data-(\d{5})-of-(\d{5})$")
_TEMP_RE = re.compile(r"^(.+)_temp$")
_NUMBER = re.compile(r"-(\d+)$")
_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
_MASK_DELTA = 0xA282EAD8
_CHUNK = 8 << 20
_DT_STRING, _DT_VARIANT = 7, 21
_MAX_INDEX = LIMITS["tf_index"]      # read whole: the daemon's memory, bounded


# ---------------------------------------------------------------- recognising


def _crc32c():
    """crc32c.crc32c, imported at the first TF check (3 MB of RSS most daemons never use)."""
    import crc32c
    return crc32c.crc32c

def state_paths(root_fd: int, d: str, listing: Listing) -> list[str] | None:
    """Prefixes the `checkpoint` state file lists (None: there is no state file)."""
    if listing.get(STATE_FILE) != FILE:
        return None
    try:
        text = read_small(root_fd, join(d, STATE_FILE), "tf_state").decode("utf-8", "replace")
    except Invalid:
        return []
    out = []
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model_checkpoint_path", "all_model_checkpoint_paths"):
            v = val.strip().strip('"')
            out.append(os.path.basename(v))
    return out


NAME = "tf"
KIND = "group"
COMMIT_MARKER = STATE_FILE


def skips_dir(name: str) -> bool:
    """`ckpt-3_temp/` is an entry of its own (a save in progress), not a folder of entries."""
    return name.endswith("_temp")


def _listed(tree: Any, d: str) -> list[str] | None:
    """What dir d's state file lists, read once per scan."""
    return tree.once((NAME, d), lambda: state_paths(tree.root_fd, d, tree.listing(d)))


def auto_claims(tree: Any, g: Group) -> bool:
    """An unnumbered prefix the state file lists is TF's."""
    listed = _listed(tree, g.dir)
    return listed is not None and g.name.rsplit("/", 1)[-1] in listed


def also_claims(g: Group) -> tuple[str, ...]:
    """TF's commit marker is part of its checkpoints."""
    return (STATE_FILE,) if not g.dir else ()


def finish(tree: Any, groups: list[Group], verdicts: dict[str, Verdict]) -> None:
    for g in groups:
        verdicts[g.name] = with_listing(verdicts[g.name], g, _listed(tree, g.dir))


def before_delete(dir_fd: int, base: str) -> None:
    """The state file must never list a deleted checkpoint: rewritten first."""
    forget_in_tf_state(dir_fd, [base])


def after_restore(dir_fd: int, base: str) -> None:
    """A dir restored on a fresh machine has no state file: CheckpointManager's
    latest_checkpoint (and tf.train.latest_checkpoint) would start from nothing. One naming
    the restored prefix is written; an existing one is left as it is."""
    write_state_if_absent(dir_fd, base)


def tidy(dir_fd: int) -> list[str]:
    """Every rotation pass: names CheckpointManager listed again after they were deleted
    (it rewrites the state file from memory at each save) are dropped."""
    return forget_missing(dir_fd)


def recognise(where: Looking) -> list[Group]:
    d, listing, explicit = where.dir, where.listing, where.explicit
    prefixes: dict[str, list[str]] = {}
    for name, kind in listing.items():
        if name.startswith("."):
            continue
        if kind == FILE and name.endswith(".index"):
            prefixes.setdefault(name[:-6], []).append(name)
        elif kind == FILE and (m := _DATA_RE.match(name)) or kind == DIR and (m := _TEMP_RE.match(name)):
            prefixes.setdefault(m.group(1), []).append(name)
    has_state = listing.get(STATE_FILE) == FILE
    groups = []
    for prefix, names in sorted(prefixes.items()):
        has_data = any(_DATA_RE.match(n) for n in names)
        if not (explicit or has_data or has_state):
            continue  # a lone foo.index or foo_temp/ is not evidence of TF
        if not explicit and all(_TEMP_RE.match(n) for n in names) and not _NUMBER.search(prefix):
            continue
        # commit marker first: the index is what makes the shards a checkpoint
        names.sort(key=lambda n: (not n.endswith(".index"), n))
        groups.append(Group(join(d, prefix), "tf", tuple(join(d, n) for n in names),
                            resume=join(d, prefix),
                            markers=(join(d, STATE_FILE),) if has_state else ()))
    return groups


# ---------------------------------------------------------------- checking

def with_listing(v: Verdict, g: Group, listed: list[str] | None) -> Verdict:
    """The bytes verdict with the commit marker applied: a prefix the state file (when there
    is one) does not list is not committed. Kept apart from the cached bytes verdict, so the
    state file's rewrite at every save re-reads no checkpoint."""
    base = g.name.rsplit("/", 1)[-1]
    if listed is None or base in listed:
        return v
    why = f"{base} not listed in the '{STATE_FILE}' state file (save not committed)"
    return replace(v, valid=False, invalid_reason=f"{why}; {v.invalid_reason}" if v.invalid_reason else why)


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    """The bytes verdict (see with_listing for the commit marker)."""
    prefix = g.name
    base = prefix.rsplit("/", 1)[-1]
    m = _NUMBER.search(base)
    step = int(m.group(1)) if m else None
    problems: list[str] = []
    names = [r.rsplit("/", 1)[-1] for r in g.members]
    temps = [n for n in names if _TEMP_RE.match(n)]
    shards = sorted(n for n in names if _DATA_RE.match(n))
    for t in temps:
        problems.append(f"{t}/: leftover temp dir (save in progress or killed)")
    if f"{base}.index" not in names:
        problems.append(f"missing {base}.index")
    else:
        try:
            _check_bundle(root_fd, prefix, shards)
        except Invalid as e:
            problems.append(str(e))
    if problems:
        return Verdict("tf", False, "; ".join(problems), step)
    return Verdict("tf", True, None, step)


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Invalid("tf-index: malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _read_block(fd: int, size: int, off: int, length: int, what: str) -> bytes:
    if off + length + 5 > size:
        raise Invalid(f"tf-index: {what} block [{off},{off + length + 5}) runs past the end ({size} bytes)")
    raw = os.pread(fd, length + 5, off)
    if len(raw) != length + 5:
        raise Invalid("tf-index: short read (file changed while checking?)")
    ctype = raw[length]
    (stored,) = struct.unpack_from("<I", raw, length + 1)
    if _mask(_crc32c()(raw[: length + 1])) != stored:
        raise Invalid(f"tf-index: {what} block CRC32C mismatch")
    if ctype != 0:
        raise Invalid(f"tf-index: {what} block is compressed (type {ctype}), not supported")
    return raw[:length]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise Invalid("tf-index: block too small")
    (nrest,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * nrest
    if end < 0:
        raise Invalid("tf-index: block restart array does not fit")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > end:
            raise Invalid("tf-index: block entry runs past its block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + vlen]
        pos += vlen


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wt = tag >> 3, tag & 7
        v: int | bytes
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            v, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            v, pos = buf[pos:pos + 4], pos + 4
        else:
            raise Invalid(f"tf-index: unsupported protobuf wire type {wt}")
        if pos > len(buf):
            raise Invalid("tf-index: truncated protobuf")
        yield field, wt, v


class _Tensor:
    __slots__ = ("crc", "dtype", "elements", "name", "offset", "shard", "size")

    def __init__(self, name: str, value: bytes) -> None:
        self.name = name
        self.dtype = 0
        self.elements = 1
        self.shard = self.offset = self.size = 0
        self.crc: int | None = None
        for f, wt, v in _proto_fields(value):
            if f == 1 and wt == 0:
                self.dtype = v  # type: ignore[assignment]
            elif f == 2 and wt == 2:
                self.elements = _elements(v)  # type: ignore[arg-type]
            elif f == 3 and wt == 0:
                self.shard = v  # type: ignore[assignment]
            elif f == 4 and wt == 0:
                self.offset = v  # type: ignore[assignment]
            elif f == 5 and wt == 0:
                self.size = v  # type: ignore[assignment]
            elif f == 6 and wt == 5:
                self.crc = struct.unpack("<I", v)[0]  # type: ignore[arg-type]


def _elements(shape: bytes) -> int:
    dims = []
    for f, wt, v in _proto_fields(shape):
        if f == 2 and wt == 2:
            size = 0
            for f2, wt2, v2 in _proto_fields(v):  # type: ignore[arg-type]
                if f2 == 1 and wt2 == 0:
                    size = v2  # type: ignore[assignment]
            dims.append(size)
    return math.prod(dims)


def _read_index(root_fd: int, rel: str) -> tuple[int, list[_Tensor]]:
    with Opened(root_fd, rel) as (fd, st):
        size = st.st_size
        if size == 0:
            raise Invalid(f"{rel.rsplit('/', 1)[-1]}: empty file (0 bytes)")
        if size < _FOOTER:
            raise Invalid(f"tf-index: file too small ({size} bytes; footer is {_FOOTER})")
        if size > _MAX_INDEX:
            raise Invalid(f"tf-index: {size} bytes, larger than any index this checks")
        footer = os.pread(fd, _FOOTER, size - _FOOTER)
        (magic,) = struct.unpack_from("<Q", footer, 40)
        if magic != _MAGIC:
            raise Invalid(f"tf-index: bad footer magic 0x{magic:016x} (truncated?)")
        _, pos = _varint(footer, 0)       # metaindex handle: unused by bundles
        _, pos = _varint(footer, pos)
        ioff, pos = _varint(footer, pos)
        ilen, pos = _varint(footer, pos)
        index_block = _read_block(fd, size, ioff, ilen, "index")
        num_shards = 1
        tensors: list[_Tensor] = []
        for _, handle in _block_entries(index_block):
            boff, p = _varint(handle, 0)
            blen, _ = _varint(handle, p)
            for key, value in _block_entries(_read_block(fd, size, boff, blen, "data")):
                if key == b"":
                    for f, wt, v in _proto_fields(value):
                        if f == 1 and wt == 0:
                            num_shards = v  # type: ignore[assignment]
                else:
                    tensors.append(_Tensor(key.decode("utf-8", "replace"), value))
    return num_shards, tensors


def _check_bundle(root_fd: int, prefix: str, shards: list[str]) -> None:
    num_shards, tensors = _read_index(root_fd, prefix + ".index")
    base = prefix.rsplit("/", 1)[-1]
    want = [f"{base}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    missing = [w for w in want if w not in shards]
    if missing:
        raise Invalid(f"missing {', '.join(missing)} (the index names {num_shards} shard(s))")
    by_shard: dict[int, list[_Tensor]] = {}
    for t in tensors:
        if t.shard >= num_shards:
            raise Invalid(f"tf-index: {t.name} is in shard {t.shard} of {num_shards}")
        by_shard.setdefault(t.shard, []).append(t)
    d = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    for shard in range(num_shards):
        with Opened(root_fd, d + want[shard]) as (fd, st):
            _check_shard(fd, st.st_size, shard, sorted(by_shard.get(shard, []), key=lambda t: t.offset))


def _check_shard(fd: int, size: int, shard: int, tensors: list[_Tensor]) -> None:
    short = [t for t in tensors if t.offset + t.size > size]
    if short:
        t = short[0]
        more = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
        raise Invalid(f"tf-data: {t.name} needs bytes [{t.offset},{t.offset + t.size}) of shard {shard}, "
                       f"shard has {size}{more}")
    end = max((t.offset + t.size for t in tensors), default=0)
    raw = [t for t in tensors if t.crc is not None and t.size and t.dtype not in (_DT_STRING, _DT_VARIANT)]
    try:
        crcs = checksum_ranges(fd, [(t.offset, t.size) for t in raw], _crc32c_update)
    except ValueError as e:
        raise Invalid(f"tf-index: tensors overlap in shard {shard} ({e})") from None
    except ShortRead:
        raise Invalid(f"tf-data: shard {shard} shrank while being checked") from None
    for t, crc in zip(raw, crcs):
        if _mask(crc) != t.crc:
            raise Invalid(f"tf-data: CRC32C mismatch for {t.name}")
    for t in tensors:
        # variants and slices carry nothing to compare: their bounds were checked above
        if t.crc is not None and t.size and t.dtype == _DT_STRING and _mask(_string_crc(fd, t)) != t.crc:
            raise Invalid(f"tf-data: CRC32C mismatch for {t.name}")
    if end != size:
        raise Invalid(f"tf-data: shard {shard} has {size - end} trailing bytes beyond the last tensor")


def _crc32c_update(data: memoryview, crc: int) -> int:
    return _crc32c()(data, crc)


def _range_crc(fd: int, off: int, n: int, crc: int) -> int:
    while n:
        b = os.pread(fd, min(n, _CHUNK), off)
        if not b:
            raise Invalid("tf-data: short read (file changed while checking?)")
        crc = _crc32c()(b, crc)
        off += len(b)
        n -= len(b)
    return crc


def _string_crc(fd: int, t: _Tensor) -> int:
    # TF's string tensors: varint64 lengths, the masked CRC32C of the lengths taken as
    # uint32 (uint64 if larger), then the bytes; the entry's CRC runs over those uint32
    # lengths, the 4 checksum bytes as stored, and the string bytes.
    head = os.pread(fd, min(t.size, 10 * t.elements + 4), t.offset)
    pos, crc = 0, 0
    for _ in range(t.elements):
        length, pos = _varint(head, pos)
        crc = _crc32c()(struct.pack("<I" if length <= 0xFFFFFFFF else "<Q", length), crc)
    if pos + 4 > t.size:
        raise Invalid(f"tf-data: string tensor {t.name} is shorter than its lengths")
    (lcrc,) = struct.unpack_from("<I", head, pos)
    if _mask(crc) != lcrc:
        raise Invalid(f"tf-data: length checksum mismatch for {t.name}")
    return _range_crc(fd, t.offset + pos, t.size - pos, crc)
