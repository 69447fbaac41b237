"""Validity verdicts for one checkpoint entry, per format (SPEC section 5).

Structure, sizes and hashes only: nothing here unpickles, imports torch or executes
anything from a checkpoint (torch.load, even weights_only=True, has had code-execution
bugs). Symlinks are never followed: files are opened relative to directory descriptors
with O_NOFOLLOW.

Formats recognised by `detect_format` (what `auto` sees in a checkpoint dir):
  trainsup  dir  step-<8+ digits>/     MANIFEST.json: every listed file, size and hash
  torch     file *.pt *.pth *.ckpt     complete zip (torch.save): EOCD at the very end,
                                       local headers match the central directory, CRC-32
                                       of every member. Legacy (pre-1.6, non-zip) torch
                                       pickles are INVALID ("legacy torch format
                                       unsupported"): proving one complete would mean
                                       walking several concatenated pickles and raw
                                       storages, and torch has written zips since 2020.
  hf        dir  checkpoint-<N>/       trainer_state.json (Trainer writes it last) parses
                                       and its global_step is N; every *.safetensors,
                                       *.bin, *.pt, *.pth is complete; no stray .tmp*.
Paddle, TensorFlow and Keras layouts are not recognised by `auto`: their checkpoints are
groups of files (or a state file naming them), not one entry, and the cheap checks the
fixtures' NOTES.md lists need cross-file logic that belongs in a format of its own.

Verdicts are cached by a fingerprint of every file involved: (st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns, mode) from lstat, so confirming an already verified checkpoint
costs a directory walk of lstat calls and no reads. ctime is included because mtime can be
set back by anyone with `touch -d`; ctime cannot.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

import xxhash

from . import naming
from .format import MANIFEST, ManifestError, hash_fd, parse_manifest
from .settle import settle

try:  # ISA-L's CRC-32 runs several times faster than zlib's: validation keeps up with the disk
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    _crc32 = zlib.crc32

from .range_reader import ShortRead, Stream

# paddle, tf, keras, lightning, safetensors: checkpoint/frameworks/ (groups of files)
FORMATS = ("auto", "trainsup", "torch", "hf", "paddle", "tf", "keras", "lightning", "safetensors")
HF_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 8 << 20
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_VERSION = "v1"


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


class _Invalid(Exception):
    """Internal: the first thing found wrong, worded for `trainsup checkpoints`."""


# ---------------------------------------------------------------- recognising entries

def detect_format(name: str, is_dir: bool, fmt: str = "auto", pattern=None) -> str | None:
    """The format an entry of a checkpoint dir is checked with, from its name and kind
    alone; None for a name the format does not claim (unmanaged: never deleted)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")
    return naming.managed_format(name, is_dir, fmt, pattern)


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
    """(digest, total bytes, newest mtime) of an entry from lstat calls only. With
    `limit`, raises TooManyFiles past that many files (the daemon's loop scans inline
    only what stays cheap: an entry of 20,000 files cost it 330 ms)."""
    h = xxhash.xxh3_128()
    total = 0
    newest = 0.0
    seen = 0

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
        stack = [("", path)]
        while stack:
            rel, p = stack.pop()
            with os.scandir(p) as it:
                if limit is None:
                    entries = list(it)
                else:
                    entries = []
                    for e in it:          # stop listing as soon as the limit is passed
                        entries.append(e)
                        if seen + len(entries) > limit:
                            raise TooManyFiles(f"{path}: more than {limit} files")
            entries.sort(key=lambda e: e.name)
            seen += len(entries)
            for e in entries:
                est = e.stat(follow_symlinks=False)
                erel = f"{rel}/{e.name}" if rel else e.name
                add(erel, est)
                if stat.S_ISDIR(est.st_mode):
                    stack.append((erel, e.path))
    return h.hexdigest(), total, newest


# ---------------------------------------------------------------- reading safely

def _open_under(dir_fd: int, rel: str) -> int:
    """Open `rel` below dir_fd without following a symlink in any component."""
    parts = rel.split("/")
    fd = dir_fd
    opened: list[int] = []
    try:
        for comp in parts[:-1]:
            fd = os.open(comp, _NOFOLLOW_DIR, dir_fd=fd)
            opened.append(fd)
        return os.open(parts[-1], _NOFOLLOW_FILE | os.O_NONBLOCK, dir_fd=fd)
    finally:
        for o in opened:
            os.close(o)


def _open_regular(dir_fd: int, rel: str) -> tuple[int, os.stat_result]:
    if "\0" in rel:
        # a NUL cannot be in a real file name: os.open would raise ValueError mid-scan
        raise _Invalid(f"{rel!r}: a NUL byte in a file name")
    try:
        fd = _open_under(dir_fd, rel)
    except FileNotFoundError:
        raise _Invalid(f"missing {rel}") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Invalid(f"{rel}: a symlink (never followed)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _Invalid(f"{rel}: not a regular file")
    return fd, st


def _pread_exact(fd: int, n: int, off: int) -> bytes:
    b = os.pread(fd, n, off)
    if len(b) != n:
        raise _Invalid(f"short read at {off} (file changed while checking?)")
    return b


# ---------------------------------------------------------------- trainsup

def _open_entry_dir(path: str, fmt: str, step: int | None):
    """An fd on a directory checkpoint, never through a symlink; or the invalid Verdict."""
    try:
        return os.open(path, _NOFOLLOW_DIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return Verdict(fmt, False, "symlink" if os.path.islink(path) else "not a directory", step)
        raise


def check_trainsup(path: str) -> Verdict:
    name = os.path.basename(path)
    step = step_from_name(name)
    dfd = _open_entry_dir(path, "trainsup", step)
    if isinstance(dfd, Verdict):
        return dfd
    try:
        try:
            mfd, mst = _open_regular(dfd, MANIFEST)
            try:
                m = parse_manifest(_pread_exact(mfd, mst.st_size, 0))
            finally:
                os.close(mfd)
        except _Invalid as e:
            msg = "no MANIFEST.json (not committed)" if str(e) == f"missing {MANIFEST}" else str(e)
            return Verdict("trainsup", False, msg, step)
        except ManifestError as e:
            return Verdict("trainsup", False, str(e), step)
        metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
        base = dict(
            step=m["step"],
            epoch=m.get("epoch") if isinstance(m.get("epoch"), int) else None,
            reason=m.get("reason") if isinstance(m.get("reason"), str) else None,
            created=m.get("created") if isinstance(m.get("created"), str) else None,
            metrics=metrics,
            save_s=float(m["save_s"]) if isinstance(m.get("save_s"), (int, float)) and not isinstance(
                m.get("save_s"), bool) and 0 <= m["save_s"] < 1e7 else None,
        )
        try:
            _check_trainsup_files(dfd, m["files"])
        except _Invalid as e:
            return Verdict("trainsup", False, str(e), **base)
        return Verdict("trainsup", True, None, **base)
    finally:
        os.close(dfd)


def _check_trainsup_files(dfd: int, files: dict) -> None:
    # Sizes first: a truncated file is caught without hashing gigabytes.
    opened: list[tuple[str, int, dict]] = []
    try:
        for rel in sorted(files):
            entry = files[rel]
            if "\0" in rel or rel.startswith("/") or ".." in rel.split("/"):
                # A hostile manifest: never a path outside the entry, never an exception.
                what = "a NUL byte in the name" if "\0" in rel else "not a file name inside the checkpoint"
                raise _Invalid(f"{rel!r}: {what}")
            fd, st = _open_regular(dfd, rel)
            opened.append((rel, fd, entry))
            if st.st_size != entry["size"]:
                raise _Invalid(f"{rel}: size {st.st_size} != manifest {entry['size']} (truncated or rewritten)")
        for rel, fd, entry in opened:
            algo = "xxh3_128" if isinstance(entry.get("xxh3_128"), str) else "sha256"
            if hash_fd(fd, algo) != entry[algo].lower():
                raise _Invalid(f"{rel}: {algo} mismatch (content corrupt or changed after commit)")
    finally:
        for _, fd, _ in opened:
            os.close(fd)


# ---------------------------------------------------------------- torch zip

_EOCD = b"PK\x05\x06"
_LOCAL = b"PK\x03\x04"


def check_torch_fd(fd: int, size: int) -> None:
    """Raise _Invalid unless fd holds a complete torch.save zip."""
    if size == 0:
        raise _Invalid("empty file (0 bytes)")
    if size < 22:
        raise _Invalid(f"zip: file too small ({size} bytes)")
    head = _pread_exact(fd, 4, 0)
    if head != _LOCAL:
        if head[:1] == b"\x80":
            raise _Invalid("not a zip archive (legacy torch format unsupported)")
        raise _Invalid("not a zip archive")
    # torch.save writes the EOCD last: a file that does not end with one was cut short.
    tail_len = min(size, 22 + 0xFFFF)
    tail = _pread_exact(fd, tail_len, size - tail_len)
    idx = tail.rfind(_EOCD)
    if idx < 0 or idx + 22 > len(tail):
        raise _Invalid("zip: no (complete) End-Of-Central-Directory record (file truncated?)")
    clen = struct.unpack_from("<H", tail, idx + 20)[0]
    if idx + 22 + clen != len(tail):
        raise _Invalid(
            f"zip: EOCD at {size - tail_len + idx} + comment {clen} does not end at file size {size}"
        )
    f = os.fdopen(fd, "rb", closefd=False)
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error) as e:
        raise _Invalid(f"zip: {e}") from None
    with zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                _check_compressed(fd, zf, info)
        stored = [i for i in infos if i.compress_type == zipfile.ZIP_STORED]
        if not stored:
            return
        # One sequential read of every stored member, checksummed while the next is read:
        # headers are parsed from the same stream, so a cold file costs one pass.
        try:
            with Stream(fd, stored[0].header_offset, zf.start_dir) as st:
                for info in stored:
                    try:
                        st.skip_to(info.header_offset)
                    except ValueError:
                        raise _Invalid(f"zip: member {info.filename} overlaps the one before it") from None
                    hdr = st.read(30)
                    nlen = struct.unpack_from("<H", hdr, 26)[0] if hdr[:4] == _LOCAL else 0
                    start = _member_start(info, hdr, st.read(nlen))
                    if start + info.compress_size > zf.start_dir:
                        raise _Invalid(f"zip: member {info.filename} runs past the central directory")
                    st.skip_to(start)
                    if st.checksum(info.compress_size, _crc32) != info.CRC:
                        raise _Invalid(f"zip: CRC mismatch in member {info.filename}")
        except ShortRead:
            raise _Invalid("zip: a member is cut short (file changed while checking?)") from None


def _member_start(info: zipfile.ZipInfo, hdr: bytes, raw_name: bytes) -> int:
    """Where a member's data starts, from its local header, which must match the central one."""
    if len(hdr) != 30 or hdr[:4] != _LOCAL:
        raise _Invalid(f"zip: no local header for member {info.filename}")
    nlen, xlen = struct.unpack_from("<HH", hdr, 26)
    if raw_name != info.orig_filename.encode("utf-8", "surrogateescape") and raw_name.decode(
        "cp437", "replace"
    ) != info.orig_filename:
        raise _Invalid(f"zip: local header of {info.filename} does not match the central directory")
    return info.header_offset + 30 + nlen + xlen


def _check_compressed(fd: int, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    hdr = os.pread(fd, 30, info.header_offset)
    nlen = struct.unpack_from("<H", hdr, 26)[0] if len(hdr) == 30 else 0
    _member_start(info, hdr, os.pread(fd, nlen, info.header_offset + 30))
    # torch stores everything; anything compressed goes through zipfile's own CRC check.
    try:
        with zf.open(info) as m:
            while m.read(_CHUNK):
                pass
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise _Invalid(f"zip: member {info.filename}: {e}") from None


def check_torch(path: str) -> Verdict:
    step = step_from_name(os.path.basename(path))
    try:
        fd = os.open(path, _NOFOLLOW_FILE | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Verdict("torch", False, "symlink", step)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Verdict("torch", False, "not a regular file", step)
        check_torch_fd(fd, st.st_size)
    except _Invalid as e:
        return Verdict("torch", False, str(e), step)
    finally:
        os.close(fd)
    return Verdict("torch", True, None, step)


# ---------------------------------------------------------------- safetensors / hf

_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "U16": 16, "I16": 16,
    "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}
_ST_MAX_HEADER = 100 << 20


def check_safetensors_fd(fd: int, size: int) -> None:
    if size == 0:
        raise _Invalid("empty file (0 bytes)")
    if size < 8:
        raise _Invalid(f"safetensors: file too small ({size})")
    (hlen,) = struct.unpack("<Q", _pread_exact(fd, 8, 0))
    if hlen > min(size - 8, _ST_MAX_HEADER):
        raise _Invalid(f"safetensors: header length {hlen} does not fit in file size {size}")
    try:
        header = json.loads(_pread_exact(fd, hlen, 8))
    except (ValueError, UnicodeDecodeError) as e:
        raise _Invalid(f"safetensors: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _Invalid("safetensors: header is not a JSON object")
    spans = []
    for tname, t in header.items():
        if tname == "__metadata__":
            continue
        try:
            b, end = t["data_offsets"]
            shape, dtype = t["shape"], t["dtype"]
            bits = _ST_DTYPE_BITS.get(dtype)
            if bits is not None and (end - b) * 8 != bits * math.prod(shape):
                raise _Invalid(f"safetensors: tensor {tname} has {end - b} bytes, its shape needs "
                               f"{bits * math.prod(shape) // 8}")
        except (KeyError, TypeError, ValueError):
            raise _Invalid(f"safetensors: tensor {tname} has a malformed header entry") from None
        spans.append((b, end, tname))
    spans.sort()
    pos = 0
    for b, end, tname in spans:
        if b != pos or end < b:
            raise _Invalid(f"safetensors: tensor {tname} data [{b},{end}) is not contiguous at {pos}")
        pos = end
    if 8 + hlen + pos != size:
        raise _Invalid(f"safetensors: header says data ends at {8 + hlen + pos}, file size is {size}")


def check_hf(path: str) -> Verdict:
    name = os.path.basename(path)
    step = step_from_name(name)
    dfd = _open_entry_dir(path, "hf", step)
    if isinstance(dfd, Verdict):
        return dfd
    problems: list[str] = []
    epoch = None
    metrics: dict = {}
    try:
        try:
            fd, st = _open_regular(dfd, "trainer_state.json")
        except _Invalid as e:
            problems.append("missing trainer_state.json (commit marker: Trainer writes it last)"
                            if str(e).startswith("missing") else str(e))
        else:
            try:
                state = json.loads(_pread_exact(fd, st.st_size, 0) if st.st_size else b"")
                if not isinstance(state, dict):
                    raise ValueError("not a JSON object")
                gs = state.get("global_step")
                if isinstance(gs, int) and step is not None and gs != step:
                    problems.append(f"trainer_state.json global_step {gs} != {step} in the dir name")
                if isinstance(state.get("epoch"), (int, float)):
                    epoch = int(state["epoch"])
                metrics = _hf_metrics(state)
            except (ValueError, UnicodeDecodeError) as e:
                problems.append(f"trainer_state.json: not valid JSON ({e})")
            finally:
                os.close(fd)
        for rel in _walk_files(dfd):
            base = rel.rsplit("/", 1)[-1]
            if base.startswith(".tmp") or base.startswith("tmp"):
                problems.append(f"stray temp file {rel} (a save was killed before its rename)")
                continue
            if not base.endswith(HF_WEIGHT_SUFFIXES):
                continue
            fd, st = _open_regular(dfd, rel)
            try:
                if base.endswith(".safetensors"):
                    check_safetensors_fd(fd, st.st_size)
                else:
                    check_torch_fd(fd, st.st_size)
            except _Invalid as e:
                problems.append(f"{rel}: {e}")
            finally:
                os.close(fd)
    except _Invalid as e:
        problems.append(str(e))
    finally:
        os.close(dfd)
    if problems:
        return Verdict("hf", False, "; ".join(problems), step, epoch, metrics=metrics)
    return Verdict("hf", True, None, step, epoch, metrics=metrics)


def _hf_metrics(state: dict) -> dict:
    """Numbers logged at the checkpoint's step (eval_loss etc.), newest wins."""
    out: dict = {}
    gs = state.get("global_step")
    for rec in state.get("log_history") or ():
        if isinstance(rec, dict) and rec.get("step") == gs:
            out.update({k: v for k, v in rec.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
    if isinstance(state.get("best_metric"), (int, float)):
        out.setdefault("best_metric", state["best_metric"])
    return out


def _walk_files(dfd: int, prefix: str = "") -> list[str]:
    out = []
    with os.scandir(dfd) as it:
        entries = list(it)
    for e in entries:
        rel = f"{prefix}{e.name}"
        if e.is_symlink():
            raise _Invalid(f"{rel}: a symlink (never followed)")
        if e.is_dir(follow_symlinks=False):
            sub = os.open(e.name, _NOFOLLOW_DIR, dir_fd=dfd)
            try:
                out.extend(_walk_files(sub, rel + "/"))
            finally:
                os.close(sub)
        else:
            out.append(rel)
    return out


# ---------------------------------------------------------------- entry point

_CHECKERS = {"trainsup": check_trainsup, "torch": check_torch, "hf": check_hf}


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
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return EntryCheck(Verdict(fmt, False, "symlink", step_from_name(os.path.basename(path))),
                          0, st.st_mtime, False)
    # a cache view may bound the walk (service._CachedOnly: the loop's inline scans)
    fp, total, newest = fingerprint(path, getattr(cache, "fingerprint_limit", None))
    key = f"{_CACHE_VERSION}|{fmt}|{key_path or os.path.abspath(path)}|{fp}"
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            try:
                return EntryCheck(Verdict.from_json(hit), total, newest, True, fp)
            except (ValueError, TypeError):
                pass  # a cache row from another version: recompute
    try:
        # No dirty page may outlive the verdict: a later write through a shared mapping
        # must fault and move ctime, so the fingerprint sees it (reprove.py).
        settle(path)
        verdict = _CHECKERS[fmt](path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        # EIO, EACCES, EMFILE...: report, and do not cache a verdict that may be transient.
        return EntryCheck(Verdict(fmt, False, f"unreadable: {e.strerror or e}",
                                  step_from_name(os.path.basename(path))), total, newest, False, fp)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        # Whatever a hostile entry makes a checker trip on is that entry's verdict,
        # never the end of the whole scan.
        verdict = Verdict(fmt, False, f"malformed: {e}"[:300], step_from_name(os.path.basename(path)))
    if cache is not None:
        # Only cache what was checked against a tree that did not move underneath us.
        try:
            if fingerprint(path)[0] == fp:
                cache.put(key, verdict.to_json())
        except OSError:
            pass
    return EntryCheck(verdict, total, newest, False, fp)
