"""Is a file one complete pickle? Walk its opcode stream without executing it.

The opcode table is pickletools' (the same one `pickletools.genops` uses), but payloads are
skipped, not read: genops materialises every BINBYTES argument, so a 2 GiB tensor would
cost 2 GiB of memory. Here memory is one read window, whatever the file holds. A pickle is
complete when STOP is its very last byte: Paddle writes the whole pickle with one write(),
so a kill leaves a prefix (or 0 bytes), and every prefix fails this walk.

`small_args` hands the caller short string/int/bytes arguments (what a step or an Adam
power accumulator looks like) in stream order, for cross-file checks; nothing is built.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from typing import Any

from ..common import Invalid

_WINDOW = 1 << 20
_MAX_LINE = 1 << 16
_SMALL = 256          # arguments up to this many bytes are decoded for small_args



@functools.cache
def _tables() -> tuple[int, dict[int, tuple[str, int]], dict[int, Any]]:
    """pickletools' opcode table, imported at the first pickle walked (0.8 MB of the RSS
    of a daemon whose jobs never write one). n in its ArgumentDescriptor: >0 a fixed
    size, else how the length is encoded."""
    import pickletools
    len_bytes = {
        pickletools.TAKEN_FROM_ARGUMENT1: ("<B", 1),
        pickletools.TAKEN_FROM_ARGUMENT4: ("<i", 4),
        pickletools.TAKEN_FROM_ARGUMENT4U: ("<I", 4),
        pickletools.TAKEN_FROM_ARGUMENT8U: ("<Q", 8),
    }
    return pickletools.UP_TO_NEWLINE, len_bytes, {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
            "SHORT_BINSTRING", "BINSTRING", "STRING"}
_BYTES = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_INTS = {"BININT": "<i", "BININT1": "<B", "BININT2": "<H"}

SmallArg = str | int | bytes | None


class _Window:
    """Sequential reads through one reused window; large payloads are skipped by seeking."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.pos = 0
        self.buf = b""
        self.buf_at = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.size:
            raise Invalid(f"pickle: opcode stream broken (truncated at byte {self.pos}: {what} needs "
                           f"{n} bytes, {self.size - self.pos} remain)")
        lo = self.pos - self.buf_at
        if lo < 0 or lo + n > len(self.buf):
            self.buf = os.pread(self.fd, max(n, _WINDOW), self.pos)
            self.buf_at = self.pos
            lo = 0
            if len(self.buf) < n:
                raise Invalid(f"pickle: short read at byte {self.pos} (file changed while checking?)")
        self.pos += n
        return self.buf[lo:lo + n]

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise Invalid(f"pickle: opcode stream broken (truncated at byte {self.pos}: {what} needs "
                           f"{n} bytes, {self.size - self.pos} remain)")
        self.pos += n

    def line(self, what: str) -> bytes:
        start = self.pos
        while True:
            lo = self.pos - self.buf_at
            if lo < 0 or lo >= len(self.buf):
                if self.pos >= self.size:
                    raise Invalid(f"pickle: opcode stream broken (truncated at byte {start}: {what} "
                                   f"has no newline)")
                self.buf = os.pread(self.fd, _WINDOW, self.pos)
                self.buf_at = self.pos
                continue
            nl = self.buf.find(b"\n", lo)
            if nl >= 0:
                self.pos = self.buf_at + nl + 1
                if self.pos - start > _MAX_LINE:
                    raise Invalid(f"pickle: {what} line at byte {start} longer than {_MAX_LINE} bytes")
                return b""  # text arguments are never needed: only their extent
            self.pos = self.buf_at + len(self.buf)
            if self.pos - start > _MAX_LINE:
                raise Invalid(f"pickle: {what} line at byte {start} longer than {_MAX_LINE} bytes")


def check_pickle_fd(fd: int, size: int,
                    small_args: Callable[[str, SmallArg], None] | None = None) -> None:
    """Raise Invalid unless fd holds exactly one complete pickle (STOP as the last byte)."""
    if size == 0:
        raise Invalid("empty file (0 bytes)")
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    up_to_newline, len_bytes, ops = _tables()
    w = _Window(fd, size)
    while w.pos < size:
        at = w.pos
        code = w.take(1, "opcode")[0]
        op = ops.get(code)
        if op is None:
            raise Invalid(f"pickle: unknown opcode 0x{code:02x} at byte {at} (not a pickle, or corrupt)")
        name = op.name
        if name == "STOP":
            if w.pos != size:
                raise Invalid(f"pickle: STOP at byte {at} but stream is {size} bytes (trailing data)")
            return
        arg = op.arg
        if arg is None:
            if small_args is not None:
                small_args(name, None)
            continue
        n = arg.n
        if n > 0:
            raw = w.take(n, name)
            if name == "FRAME":
                (flen,) = struct.unpack("<Q", raw)
                if w.pos + flen > size:
                    raise Invalid(f"pickle: opcode stream broken (frame at byte {at} needs {flen} bytes, "
                                   f"{size - w.pos} remain)")
            elif small_args is not None:
                fmt = _INTS.get(name)
                small_args(name, struct.unpack(fmt, raw)[0] if fmt else None)
        elif n == up_to_newline:
            w.line(name)
            if name in ("GLOBAL", "INST"):
                w.line(name)  # module and qualname: two lines
            if small_args is not None:
                small_args(name, None)
        else:
            fmt, width = len_bytes[n]
            (length,) = struct.unpack(fmt, w.take(width, name))
            if length < 0:
                raise Invalid(f"pickle: negative length {length} for {name} at byte {at}")
            if small_args is not None and length <= _SMALL:
                payload = w.take(length, name)
                if name in _STRINGS:
                    small_args(name, payload.decode("utf-8", "replace"))
                elif name in _BYTES:
                    small_args(name, payload)
                else:
                    small_args(name, int.from_bytes(payload, "little", signed=True))
            else:
                w.skip(length, name)
                if small_args is not None:
                    small_args(name, None)
    raise Invalid("pickle: opcode stream broken (pickle exhausted before seeing STOP)")
