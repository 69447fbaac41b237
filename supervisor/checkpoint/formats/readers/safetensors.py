"""A safetensors file, proven complete from its header: the JSON header fits, every tensor's
byte span matches its dtype and shape, the spans tile the data without gaps, and the data
ends exactly at the end of the file."""

from __future__ import annotations

import json
import math
import struct

from ..common import LIMITS, Invalid, pread_exact

_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "U16": 16, "I16": 16,
    "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}
_ST_MAX_HEADER = LIMITS["safetensors_header"]   # read whole: the daemon's memory, bounded


def check_safetensors_fd(fd: int, size: int) -> None:
    if size == 0:
        raise Invalid("empty file (0 bytes)")
    if size < 8:
        raise Invalid(f"safetensors: file too small ({size})")
    (hlen,) = struct.unpack("<Q", pread_exact(fd, 8, 0))
    if hlen > min(size - 8, _ST_MAX_HEADER):
        raise Invalid(f"safetensors: header length {hlen} does not fit in file size {size}")
    try:
        header = json.loads(pread_exact(fd, hlen, 8))
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid(f"safetensors: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise Invalid("safetensors: header is not a JSON object")
    spans = []
    for tname, t in header.items():
        if tname == "__metadata__":
            continue
        try:
            b, end = t["data_offsets"]
            shape, dtype = t["shape"], t["dtype"]
            bits = _ST_DTYPE_BITS.get(dtype)
            if bits is not None and (end - b) * 8 != bits * math.prod(shape):
                raise Invalid(f"safetensors: tensor {tname} has {end - b} bytes, its shape needs "
                               f"{bits * math.prod(shape) // 8}")
        except (KeyError, TypeError, ValueError):
            raise Invalid(f"safetensors: tensor {tname} has a malformed header entry") from None
        spans.append((b, end, tname))
    spans.sort()
    pos = 0
    for b, end, tname in spans:
        if b != pos or end < b:
            raise Invalid(f"safetensors: tensor {tname} data [{b},{end}) is not contiguous at {pos}")
        pos = end
    if 8 + hlen + pos != size:
        raise Invalid(f"safetensors: header says data ends at {8 + hlen + pos}, file size is {size}")
