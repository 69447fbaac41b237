"""A job's stdout+stderr in a size-capped, rotated log file, and `trainsup logs -f`.

Under a shim (trainsup-shim) the shim appends the job's output to the file itself and
rotates it: the output never passes through the daemon, so no daemon crash, re-exec or
busy loop can block or break it. Without one the loop reads the job's pipe and writes
the file here. Either way the daemon appends its own `[trainsup]` notes, and followers
are fed from the file (inotify on it, read only while someone follows), so they see the
job's output and the notes in the order the file has them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..printable import printable
from .launch.cgroup import IN_DELETE_SELF, IN_MODIFY, IN_MOVE_SELF, CgroupError, EventsWatcher
from .pipes import read_ready

log = logging.getLogger("trainsup.joblog")
_TAIL_CHUNK = 65536
_TAIL_MAX_PER_WAKE = 1 << 20      # then the loop's other work comes first, and the rest


class Followers(set):
    """The queues following a log; tells its log when it gains its first or loses its
    last (the file is only watched while someone follows)."""

    def __init__(self, changed: Callable[[], None]):
        super().__init__()
        self._changed = changed

    def add(self, q: asyncio.Queue) -> None:
        super().add(q)
        self._changed()

    def discard(self, q: object) -> None:
        super().discard(q)
        self._changed()

    def remove(self, q: asyncio.Queue) -> None:
        super().remove(q)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def __ior__(self, other: Iterable) -> Followers:   # type: ignore[override,misc]
        self.update(other)
        self._changed()
        return self


class _Tail:
    """New bytes of the log file, as they land, to `deliver`; across rotations."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, deliver: Callable[[bytes], None]):
        self.path = path
        self.loop = loop
        self.deliver = deliver
        self.watcher = EventsWatcher.of(loop)
        self.fd = -1
        self.wd = -1
        self.offset = 0
        self._again = False
        self._open(at_end=True)

    def _open(self, at_end: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # not a job path: the daemon's job log
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.offset = os.fstat(self.fd).st_size if at_end else 0
        try:
            self.wd = self.watcher.watch(self.path, self._on_event, IN_MODIFY | IN_MOVE_SELF | IN_DELETE_SELF)
        except CgroupError as e:
            log.warning("log %s: cannot follow: %s", self.path, e)
            self.wd = -1

    def _on_event(self) -> None:
        if self.fd < 0:
            return
        self._again = False
        took = 0
        while took < _TAIL_MAX_PER_WAKE:
            try:
                data = os.pread(self.fd, _TAIL_CHUNK, self.offset)
            except OSError:
                break
            if not data:
                if os.fstat(self.fd).st_size < self.offset:
                    self.offset = 0          # truncated by hand: from its start again
                    continue
                break
            self.offset += len(data)
            took += len(data)
            self.deliver(data)
        else:
            if not self._again:              # more is waiting: after the loop's other work
                self._again = True
                self.loop.call_soon(self._on_event)
            return
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:                            # rotated: the rest of the old file was read above
            self._close()
            try:
                self._open(at_end=False)
            except OSError as e:
                log.warning("log %s: cannot follow after rotation: %s", self.path, e.strerror)
                return
            self._on_event()

    def _close(self) -> None:
        if self.wd >= 0:
            self.watcher.unwatch(self.wd, self._on_event)
            self.wd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self._close()


class JobLog:
    def __init__(self, path: Path, max_bytes: int = 50 << 20, backups: int = 3):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.followers: Followers = Followers(self._followers_changed)
        # While a shim writes the file the daemon appends its notes and never rotates
        # (two rotators would each move the other's file one step too far).
        self.shim_writes = False
        self._fd = -1
        self._size = 0
        self._read_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_failed = False
        self._tail: _Tail | None = None

    def _followers_changed(self) -> None:
        if self.followers and self._tail is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            try:
                self._tail = _Tail(self.path, loop, self._fan_out)
            except OSError as e:
                log.warning("log %s: cannot follow: %s", self.path, e.strerror)
        elif not self.followers and self._tail is not None:
            self._tail.close()
            self._tail = None

    def _fan_out(self, data: bytes) -> None:
        for q in list(self.followers):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:
                pass    # a slow follower loses lines, the job never blocks on it

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
        try:
            self._open()
            if self._size and self._size + len(data) > self.max_bytes and not self.shim_writes:
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
        if self.shim_writes and self._fd >= 0:
            # The shim may have rotated the file: the note goes to the file by that name.
            os.close(self._fd)
            self._fd = -1
        # one line whatever it quotes (a checkpoint's name, a reason): the job's log is read
        # by people, and a newline there forged a trainsup line
        self.write(f"[trainsup] {printable(text)}\n".encode())
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
        if self._tail is not None:
            self._tail.close()
            self._tail = None
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
