"""A job's stdout+stderr: read from a pipe by the event loop, written to a size-capped,
rotated log file, and fanned out to `trainsup logs -f` followers."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from .pipes import read_ready

log = logging.getLogger("trainsup.joblog")


class JobLog:
    def __init__(self, path: Path, max_bytes: int = 50 << 20, backups: int = 3):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.followers: set[asyncio.Queue] = set()
        self._fd = -1
        self._size = 0
        self._read_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_failed = False

    def _open(self) -> None:
        if self._fd < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # not a job path: the daemon's job log
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        for i in range(self.backups, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._open()

    def write(self, data: bytes) -> None:
        for q in list(self.followers):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:
                pass    # a slow follower loses lines, the job never blocks on it
        try:
            self._open()
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            os.write(self._fd, data)
            self._size += len(data)
            self._write_failed = False
        except OSError as e:
            if not self._write_failed:   # a full disk: say it once, keep the job running
                log.error("log %s: cannot write: %s (output dropped until it recovers)", self.path, e.strerror)
                self._write_failed = True

    def note(self, text: str) -> None:
        """A line from trainsup itself, so the log tells the whole story of each attempt."""
        self.write(f"[trainsup] {text}\n".encode())
        if self._read_fd < 0 and self._fd >= 0:
            # No attempt is writing: the file is not held open between attempts (200 jobs
            # that cannot start must not hold 200 fds the control socket needs).
            os.close(self._fd)
            self._fd = -1

    # -- the pipe from the child ----------------------------------------------------
    def new_pipe(self, loop: asyncio.AbstractEventLoop) -> int:
        """Return the write end for the child; the loop reads the other end."""
        self.close_pipe()
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        self._read_fd, self._loop = r, loop
        loop.add_reader(r, self._on_readable)
        return w

    def _on_readable(self) -> None:
        data = read_ready(self._read_fd)
        if data is None:
            return
        if not data:
            self.close_pipe()
            return
        self.write(data)

    def drain(self) -> None:
        """Read what the child left in the pipe before it exited."""
        if self._read_fd < 0:
            return
        while True:
            try:
                data = os.read(self._read_fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self.write(data)

    def close_pipe(self) -> None:
        if self._read_fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            self._read_fd = -1

    def close(self) -> None:
        self.close_pipe()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def tail(self, n: int) -> str:
        """The last n lines (from the current file and, if needed, the previous one)."""
        chunks: list[bytes] = []
        need = n
        for p in (self.path, self.path.with_name(self.path.name + ".1")):
            try:
                # not a job path: the daemon's job log
                with open(p, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    size = f.tell()
                    f.seek(max(0, size - max(65536, 256 * need)))
                    lines = f.read().splitlines(keepends=True)
            except OSError:
                continue
            take = lines[-need:] if need else []
            chunks.insert(0, b"".join(take))
            need -= len(take)
            if need <= 0:
                break
        return b"".join(chunks).decode(errors="replace")
