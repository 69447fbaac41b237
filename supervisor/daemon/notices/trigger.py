"""The preemption trigger file (SPEC section 7: `preemption.trigger_file`).

A file appearing at the path (created, or renamed into place) preempts every job. The
parent folder is watched with inotify through watchdog; the handler runs on watchdog's
observer thread under its lock, so it only calls `on_notice`.

Who may preempt every job is who may write that folder: it is checked like the control
socket's (trust.py) before the daemon serves anything, and a daemon whose trigger folder
others can write (a world-writable sticky /tmp let any user preempt every job) refuses to
start. A file that appears owned by anyone but root or the daemon's user is ignored.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from ...printable import printable
from ...trust import daemon_groups, daemon_owners, unsafe_dir, user_label
from . import Notice

log = logging.getLogger("trainsup.notices.trigger")


class TriggerRefused(Exception):
    """The trigger file's folder lets others preempt every job: one line, exit 2."""


def prepare_trigger_dir(path: Path) -> None:
    """Create the trigger file's folder if missing, then check it like the socket's: a
    folder someone else can write lets them preempt every job. Raises TriggerRefused."""
    parent = Path(os.path.abspath(path)).parent
    try:
        if not parent.is_dir():
            # Like systemd's RuntimeDirectory=: the user asked for a file there.
            parent.mkdir(parents=True, exist_ok=True)
            log.info("created %s to watch for the trigger file %s", parent, Path(path).name)
        st = os.stat(parent)
    except OSError as e:
        raise TriggerRefused(f"preemption.trigger_file: cannot use {printable(parent)}: {e.strerror}") from None
    why = unsafe_dir(st, daemon_owners(), daemon_groups())
    if why:
        raise TriggerRefused(f"preemption.trigger_file {printable(path)}: refusing to watch it: its folder "
                             f"{printable(parent)} {why.removeprefix('it ')}, so any user could preempt "
                             "every job; use a folder only root or the daemon's user can write "
                             "(e.g. /run/trainsup)")


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: TriggerFile):
        self.owner = owner

    def on_created(self, event: Any) -> None:
        if not event.is_directory and os.fsdecode(event.src_path) == self.owner.path_str:
            self.owner._appeared("created")

    def on_moved(self, event: Any) -> None:
        if os.fsdecode(event.dest_path) == self.owner.path_str:
            self.owner._appeared("moved into place")
        if os.fsdecode(event.src_path) == self.owner.path_str:
            self.owner._gone()

    def on_deleted(self, event: Any) -> None:
        if os.fsdecode(event.src_path) == self.owner.path_str:
            self.owner._gone()


class TriggerFile:
    """Calls `on_notice` once each time the file appears, and once at start() if it is
    already there. Touching a file that is already present does not fire again."""

    def __init__(self, path: str | os.PathLike[str], on_notice: Callable[[Notice], None]) -> None:
        self.path = Path(os.path.abspath(path))
        self.path_str = str(self.path)
        self.on_notice = on_notice
        self._lock = threading.Lock()
        self._present = False
        self._observer: InotifyObserver | None = None

    @property
    def armed(self) -> bool:
        """True when the next appearance of the file will fire."""
        with self._lock:
            return not self._present

    def start(self) -> None:
        """Raises TriggerRefused when the folder is unsafe (the daemon checks before it
        serves anything: prepare_trigger_dir)."""
        if self._observer is not None:
            return
        parent = self.path.parent
        prepare_trigger_dir(self.path)
        observer = InotifyObserver()
        observer.schedule(_Handler(self), str(parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        # Checked after the watch is in place, so a file created in between is seen by
        # one of the two; _appeared() makes sure it fires only once.
        if self.path.exists():
            self._appeared("present at start")

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer is not threading.current_thread():
                observer.join(timeout=2.0)

    def _appeared(self, how: str) -> None:
        try:
            owner = os.lstat(self.path).st_uid
        except OSError:
            return                      # gone again already: nothing to act on
        if owner not in daemon_owners():
            # The folder is checked, but a member of a trusted group, or a file moved in
            # from elsewhere on the same filesystem, is still not root's say-so.
            log.warning("trigger file %s is owned by %s, not root or the daemon's user: ignored",
                        printable(self.path), user_label(owner))
            return
        with self._lock:
            if self._present or self._observer is None:
                return
            self._present = True
        try:
            self.on_notice(Notice(source="trigger-file", kind="preempt", deadline=None,
                                  detail=f"trigger file {self.path} {how}"))
        except Exception:
            log.exception("trigger file callback failed")

    def _gone(self) -> None:
        with self._lock:
            self._present = False
