"""Was an HDF5 file closed cleanly? Read its superblock, nothing else (no h5py).

A writer sets bit 0 of the file-consistency flags while it has the file open and clears
it on close, and writes the end-of-file address on close: a file killed mid-write keeps
flags=1 and a stale or too-large end-of-file address. v2/v3 superblocks also carry a
Jenkins lookup3 checksum of themselves. HDF5 has no data checksums (v0, h5py's default):
a bit flip inside a dataset is invisible here.
"""

from __future__ import annotations

import os
import struct

from ..common import Invalid

SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


_M = 0xFFFFFFFF


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3.c mix()."""
    a = ((a - c) & _M) ^ _rot(c, 4)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rot(a, 6)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rot(b, 8)
    b = (b + a) & _M
    a = ((a - c) & _M) ^ _rot(c, 16)
    c = (c + b) & _M
    b = ((b - a) & _M) ^ _rot(a, 19)
    a = (a + c) & _M
    c = ((c - b) & _M) ^ _rot(b, 4)
    b = (b + a) & _M
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """lookup3.c final(); the hash is c."""
    c = ((c ^ b) - _rot(b, 14)) & _M
    a = ((a ^ c) - _rot(c, 11)) & _M
    b = ((b ^ a) - _rot(a, 25)) & _M
    c = ((c ^ b) - _rot(b, 16)) & _M
    a = ((a ^ c) - _rot(c, 4)) & _M
    b = ((b ^ a) - _rot(a, 14)) & _M
    c = ((c ^ b) - _rot(b, 24)) & _M
    return c


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' hashlittle (lookup3.c), as H5_checksum_lookup3 computes it."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & _M
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & _M
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & _M
        a, b, c = _mix(a, b, c)
        i += 12
    tail = data[i:]
    if not tail:
        return c
    tail = tail + b"\0" * (12 - len(tail))
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)


def _find_superblock(read, size: int) -> int:
    off = 0
    while off + 8 <= size:
        if read(8, off) == SIGNATURE:
            return off
        off = 512 if off == 0 else off * 2
    raise Invalid("hdf5: no HDF5 superblock signature")


def check_hdf5(read, size: int) -> None:
    """Raise Invalid unless the HDF5 file of `size` bytes was closed cleanly.

    read(n, off) -> bytes reads from the file (or from a zip member).
    """
    if size == 0:
        raise Invalid("empty file (0 bytes)")
    sb = _find_superblock(read, size)
    head = read(min(128, size - sb), sb)
    if len(head) < 12:
        raise Invalid("hdf5: superblock cut short (file truncated)")
    version = head[8]
    problems = []
    if version in (0, 1):
        if len(head) < 24:
            raise Invalid("hdf5: superblock cut short (file truncated)")
        osz = head[13]
        (flags,) = struct.unpack_from("<I", head, 20)
        at = 24 if version == 0 else 28
        need = at + 4 * osz
    elif version in (2, 3):
        osz = head[9]
        flags = head[11]
        at = 12
        need = 12 + 4 * osz + 4
    else:
        raise Invalid(f"hdf5: unknown superblock version {version}")
    if osz not in (2, 4, 8):
        raise Invalid(f"hdf5: bad size of offsets {osz}")
    if len(head) < need:
        raise Invalid("hdf5: superblock cut short (file truncated)")

    def addr(k: int) -> int:
        return int.from_bytes(head[at + k * osz: at + (k + 1) * osz], "little")

    base, eof = addr(0), addr(2)
    if version in (2, 3):
        (stored,) = struct.unpack_from("<I", head, need - 4)
        if lookup3(head[: need - 4]) != stored:
            problems.append("hdf5: superblock checksum mismatch")
    if flags & 1:
        problems.append(f"hdf5: superblock consistency flags=0x{flags:x} (bit0: file still marked open "
                        f"for write; writer never closed it)")
    if eof not in (size, size - base):
        why = "file truncated" if eof > size - base else "superblock stale: writer never closed the file"
        problems.append(f"hdf5: superblock end-of-file address {eof} != actual size {size} ({why})")
    if problems:
        raise Invalid("; ".join(problems))


def check_hdf5_fd(fd: int, size: int) -> None:
    check_hdf5(lambda n, off: os.pread(fd, n, off), size)
