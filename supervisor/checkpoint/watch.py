"""Tell the daemon, cheaply and from the observer thread, that a checkpoint dir changed.

One watchdog Observer is shared by every watcher (the daemon may watch hundreds of dirs;
watchdog's inotify observer multiplexes them over one inotify fd). A watcher watches its
checkpoint dir non-recursively (a landing is a rename of `.trainsup-tmp/step-N.<pid>` to
`step-N`, seen as IN_MOVED_TO; torch/HF saves in place end with IN_CLOSE_WRITE) and the
parent dir, to see the checkpoint dir itself deleted, moved, recreated or replaced by a
symlink. When that happens the dir watch is re-armed on whatever real directory now has
the name (never through a symlink).

on_change(reason) runs on the observer thread, under the observer's lock: it must only
post to the daemon's loop (loop.call_soon_threadsafe). Reasons: "changed", "dir-deleted",
"dir-created", "dir-moved". The daemon's periodic rescan stays the source of truth.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

try:
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    # watchdog holds an unmatched IN_MOVED_FROM for 0.5 s hoping to pair it, and every later
    # event of the same watch queues behind it. Rotation moves entries out into the trash
    # dir after every save, so the next landing would be seen 0.5 s late. We only need to
    # know that something changed: no pairing, no delay.
    InotifyMoveEventGrouper.delay = 0.0
except ImportError:     # older watchdog: no grouper, no delay
    pass

_DIR_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent,
               FileMovedEvent, DirMovedEvent, FileClosedEvent]
# The parent may be a busy workdir: only entries appearing and disappearing matter there.
_PARENT_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent,
                  FileMovedEvent, DirMovedEvent]


class ObserverHub:
    """One Observer shared by many watchers, with reference-counted schedules."""

    def __init__(self, observer=None) -> None:
        self.observer = observer if observer is not None else Observer()
        # The observer thread holds the observer's own RLock while it dispatches, and a
        # handler may re-arm a watch (schedule takes that lock again). Using that same
        # lock for our bookkeeping and for every watcher gives one lock order: no deadlock
        # between a dispatching handler and a stop() on another thread.
        self.lock = getattr(self.observer, "_lock", None) or threading.RLock()
        self._lock = self.lock
        self._refs: dict[object, int] = {}

    def start(self) -> None:
        with self._lock:
            if not self.observer.is_alive():
                self.observer.daemon = True
                self.observer.start()

    def add(self, handler, path: str, events, recursive: bool = False) -> object:
        with self._lock:
            watch = self.observer.schedule(handler, path, recursive=recursive, event_filter=events)
            self._refs[watch] = self._refs.get(watch, 0) + 1
            return watch

    def remove(self, handler, watch) -> None:
        with self._lock:
            n = self._refs.get(watch, 0) - 1
            try:
                if n <= 0:
                    self._refs.pop(watch, None)
                    self.observer.unschedule(watch)
                else:
                    self._refs[watch] = n
                    self.observer.remove_handler_for_watch(handler, watch)
            except KeyError:
                pass  # already gone (its dir was deleted and the emitter stopped)

    def stop(self) -> None:
        # Not under the lock: the observer thread may need it to finish its last dispatch.
        if self.observer.is_alive():
            self.observer.stop()
            self.observer.join(5)


_shared_hub: ObserverHub | None = None
_shared_lock = threading.Lock()


def shared_hub() -> ObserverHub:
    global _shared_hub
    with _shared_lock:
        if _shared_hub is None:
            _shared_hub = ObserverHub()
        return _shared_hub


class _Dispatch(FileSystemEventHandler):
    def __init__(self, fn: Callable[[FileSystemEvent], None]) -> None:
        self._fn = fn

    def dispatch(self, event: FileSystemEvent) -> None:
        self._fn(event)


class CheckpointWatcher:
    def __init__(self, ckpt_dir, on_change: Callable[[str], None], hub: ObserverHub | None = None):
        self.path = os.path.abspath(os.fspath(ckpt_dir))
        self.parent = os.path.dirname(self.path)
        self.on_change = on_change
        self.hub = hub if hub is not None else shared_hub()
        self._dir_handler = _Dispatch(self._on_dir_event)
        self._parent_handler = _Dispatch(self._on_parent_event)
        self._dir_watch: object | None = None
        self._parent_watch: object | None = None
        self._lock = self.hub.lock
        self._running = False

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
            self.hub.start()
            if os.path.isdir(self.parent):
                self._parent_watch = self.hub.add(self._parent_handler, self.parent, _PARENT_EVENTS)
            self._arm_dir()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            if self._dir_watch is not None:
                self.hub.remove(self._dir_handler, self._dir_watch)
                self._dir_watch = None
            if self._parent_watch is not None:
                self.hub.remove(self._parent_handler, self._parent_watch)
                self._parent_watch = None

    @property
    def armed(self) -> bool:
        return self._dir_watch is not None

    def _arm_dir(self) -> None:
        # caller holds self._lock
        if self._dir_watch is not None:
            self.hub.remove(self._dir_handler, self._dir_watch)
            self._dir_watch = None
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode):  # never a symlink: we would watch someone else's dir
            # Recursive: frameworks complete a checkpoint inside its entry dir (HF's
            # trainer_state.json, Keras' metadata, Lightning's version_N/checkpoints/).
            # If the inotify watch limit is reached, fall back to the top level alone.
            for recursive in (True, False):
                try:
                    self._dir_watch = self.hub.add(self._dir_handler, self.path, _DIR_EVENTS, recursive)
                    break
                except OSError as e:
                    self._dir_watch = None  # vanished again; the parent watch will tell us
                    if e.errno != errno.ENOSPC:
                        break

    def _on_dir_event(self, event: FileSystemEvent) -> None:
        if event.src_path == self.path:
            return  # IN_DELETE_SELF: the parent watch reports it with context
        if all(self._inside_hidden(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p):
            return  # inside .trainsup-tmp/ or .trainsup-trash/: a landing is a move out of them
        self.on_change("changed")

    def _inside_hidden(self, path) -> bool:
        # a prefix test, not relpath: a 20k-file entry moving in is 20k events here
        p = os.fsdecode(path)
        prefix = self.path.rstrip(os.sep) + os.sep + "."
        return p.startswith(prefix) and os.sep in p[len(prefix):]

    def _on_parent_event(self, event: FileSystemEvent) -> None:
        src = event.src_path
        dest = getattr(event, "dest_path", "") or ""
        if src != self.path and dest != self.path:
            return
        if event.event_type == "moved":
            reason = "dir-moved"
        elif event.event_type == "created":
            reason = "dir-created"
        else:
            reason = "dir-deleted"
        with self._lock:
            if self._running:
                self._arm_dir()
        self.on_change(reason)
