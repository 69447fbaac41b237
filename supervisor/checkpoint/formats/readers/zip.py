"""A torch.save zip, proven complete without unpickling: the End-Of-Central-Directory record
ends the file (torch writes it last), every local header matches the central directory, and
every member's CRC-32 matches (one sequential read of the stored members)."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib

from ... import budget
from ...range_reader import ShortRead, Stream
from ..common import Invalid, pread_exact

try:  # ISA-L's CRC-32 runs several times faster than zlib's: validation keeps up with the disk
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    _crc32 = zlib.crc32

_CHUNK = 8 << 20
# Deflate cannot expand past about 1032:1; a member claiming more is a bomb, refused unread.
_MAX_RATIO = 1100


_EOCD = b"PK\x05\x06"
_LOCAL = b"PK\x03\x04"


def check_torch_fd(fd: int, size: int) -> None:
    """Raise Invalid unless fd holds a complete torch.save zip."""
    if size == 0:
        raise Invalid("empty file (0 bytes)")
    if size < 22:
        raise Invalid(f"zip: file too small ({size} bytes)")
    head = pread_exact(fd, 4, 0)
    if head != _LOCAL:
        if head[:1] == b"\x80":
            raise Invalid("not a zip archive (legacy torch format unsupported)")
        raise Invalid("not a zip archive")
    # torch.save writes the EOCD last: a file that does not end with one was cut short.
    tail_len = min(size, 22 + 0xFFFF)
    tail = pread_exact(fd, tail_len, size - tail_len)
    idx = tail.rfind(_EOCD)
    if idx < 0 or idx + 22 > len(tail):
        raise Invalid("zip: no (complete) End-Of-Central-Directory record (file truncated?)")
    clen = struct.unpack_from("<H", tail, idx + 20)[0]
    if idx + 22 + clen != len(tail):
        raise Invalid(
            f"zip: EOCD at {size - tail_len + idx} + comment {clen} does not end at file size {size}"
        )
    try:
        zf = zipfile.ZipFile(os.fdopen(fd, "rb", closefd=False))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error) as e:
        raise Invalid(f"zip: {e}") from None
    with zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        refuse_overlaps(infos, zf.start_dir)
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
                        raise Invalid(f"zip: member {info.filename} overlaps the one before it") from None
                    hdr = st.read(30)
                    nlen = struct.unpack_from("<H", hdr, 26)[0] if hdr[:4] == _LOCAL else 0
                    start = _member_start(info, hdr, st.read(nlen))
                    if start + info.compress_size > zf.start_dir:
                        raise Invalid(f"zip: member {info.filename} runs past the central directory")
                    st.skip_to(start)
                    if st.checksum(info.compress_size, _crc32) != info.CRC:
                        raise Invalid(f"zip: CRC mismatch in member {info.filename}")
        except ShortRead:
            raise Invalid("zip: a member is cut short (file changed while checking?)") from None


def _member_start(info: zipfile.ZipInfo, hdr: bytes, raw_name: bytes) -> int:
    """Where a member's data starts, from its local header, which must match the central one."""
    if len(hdr) != 30 or hdr[:4] != _LOCAL:
        raise Invalid(f"zip: no local header for member {info.filename}")
    nlen, xlen = struct.unpack_from("<HH", hdr, 26)
    if raw_name != info.orig_filename.encode("utf-8", "surrogateescape") and raw_name.decode(
        "cp437", "replace"
    ) != info.orig_filename:
        raise Invalid(f"zip: local header of {info.filename} does not match the central directory")
    return info.header_offset + 30 + nlen + xlen


def refuse_overlaps(infos: list[zipfile.ZipInfo], start_dir: int) -> None:
    """Members sorted by offset must each end before the next begins, and names be
    unique: found, a 226 KB zip of 2000 central entries all pointing at one 100 MiB member
    of zeros kept a worker inflating for minutes. Refused before a byte is inflated."""
    names: set[str] = set()
    for k, info in enumerate(infos):
        if info.filename in names:
            raise Invalid(f"zip: member {info.filename} appears twice")
        names.add(info.filename)
        end = info.header_offset + 30 + len(info.orig_filename.encode("utf-8", "surrogateescape")) \
            + info.compress_size
        nxt = infos[k + 1].header_offset if k + 1 < len(infos) else start_dir
        if end > nxt:
            raise Invalid(f"zip: member {info.filename} overlaps the one after it")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_RATIO * info.compress_size + 65536:
            raise Invalid(f"zip: member {info.filename} claims {info.file_size} bytes from "
                          f"{info.compress_size} compressed (a bomb)")


def _check_compressed(fd: int, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    hdr = os.pread(fd, 30, info.header_offset)
    nlen = struct.unpack_from("<H", hdr, 26)[0] if len(hdr) == 30 else 0
    _member_start(info, hdr, os.pread(fd, nlen, info.header_offset + 30))
    # torch stores everything; anything compressed goes through zipfile's own CRC check,
    # which reads no more than the member's declared size (refuse_overlaps bounds it).
    try:
        with zf.open(info) as m:
            while True:
                chunk = m.read(_CHUNK)
                if not chunk:
                    break
                budget.tick()       # yields and cancels; the compressed bytes are what was read
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise Invalid(f"zip: member {info.filename}: {e}") from None
