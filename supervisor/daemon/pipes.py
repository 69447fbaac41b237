"""Reading a child's pipe on the loop: the loop is woken when it is readable and takes what
is there, never waiting for more."""

from __future__ import annotations

import os


def read_ready(fd: int, limit: int = 65536) -> bytes | None:
    """What the non-blocking pipe holds now (at most `limit` bytes); b"" when the writer is
    gone (end of file, or the pipe broke); None when nothing is there yet."""
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return None
    except OSError:
        return b""
