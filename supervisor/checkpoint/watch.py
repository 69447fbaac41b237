"""Tell the daemon, cheaply and from the reader thread, that a checkpoint dir changed.

One inotify fd and one reader thread serve every job (the daemon may watch hundreds of
dirs). Each job's watcher owns a bounded set of watches:

- its checkpoint dir (a landing is a rename of `.trainsup-tmp/step-N.<pid>` to `step-N`,
  seen as IN_MOVED_TO; torch/HF saves in place end with IN_CLOSE_WRITE);
- the dir's parent, to see the checkpoint dir itself deleted, moved, recreated or replaced
  by a symlink (then the watches are re-armed on whatever real dir now has the name, never
  through a symlink);
- dirs below it, up to SUB_DEPTH levels (HF completes a checkpoint inside its entry dir,
  Lightning saves into lightning_logs/version_N/checkpoints/), at most SUB_WATCHES of them,
  newest first: a new dir takes the place of the oldest. Dot-dirs are never watched.

Found: watchdog's recursive watch walked a 3000-deep chain of dirs in a job's checkpoint
dir with os.walk on its one emitter thread, raised RecursionError there, and from then on
no dir of any job was watched; 3000 empty dirs under a dot-dir took 3001 of root's
host-wide inotify watches. Here a job's dir shape costs at most its budget, an error in a
callback is logged and confined to it, and the reader thread, should anything end its
loop, starts it again and tells every watcher to rescan (events may have been missed).

on_change(reason) runs on the reader thread: it must only post to the daemon's loop
(loop.call_soon_threadsafe). Reasons: "changed", "dir-deleted", "dir-created",
"dir-moved". The daemon's periodic rescan stays the source of truth.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable

from .jobfile import Invalid, open_dir, open_entry_dir
from .walk import listdir

log = logging.getLogger("trainsup.checkpoint")

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# One mask for every watch (two jobs may watch one dir: one kernel watch, both told). Watches
# are added through /proc/self/fd/N of a dir opened O_NOFOLLOW: the kernel's own link is
# followed (IN_DONT_FOLLOW would watch that link), a job's symlink never was.
MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
        | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)

SUB_DEPTH = 3          # levels below the checkpoint dir (Lightning: lightning_logs/version_N/checkpoints)
SUB_WATCHES = 32       # watches below the checkpoint dir, per job

_EVENT = struct.Struct("iIII")
Callback = Callable[[int, int, str], None]       # (wd, mask, name) of one event on a watched dir


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.add = libc.inotify_add_watch
        self.add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm = libc.inotify_rm_watch


_libc: _Libc | None = None


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class InotifyHub:
    """One inotify fd and one reader thread, shared by every watcher; watches counted by
    subscriber, so two jobs watching one dir share its kernel watch."""

    def __init__(self) -> None:
        global _libc
        if _libc is None:
            _libc = _Libc()
        self.libc = _libc
        self.lock = threading.RLock()
        self._fd = -1
        self._subs: dict[int, dict[object, Callback]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.restarts = 0          # how often the reader loop was started again

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        with self.lock:
            if self._fd < 0:
                fd = self.libc.init1(IN_NONBLOCK | IN_CLOEXEC)
                if fd < 0:
                    raise _os_error("inotify_init1")
                self._fd = fd
            self.ensure_running()

    def ensure_running(self) -> None:
        """The reader thread runs (started again if something ended it)."""
        with self.lock:
            if self._fd < 0 or self._stopping.is_set():
                return
            if self._thread is not None and self._thread.is_alive():
                return
            if self._thread is not None:
                self.restarts += 1
                log.error("checkpoint watcher: the reader thread had ended; started again")
                self._broadcast(IN_Q_OVERFLOW)
            self._thread = threading.Thread(target=self._run, name="checkpoint-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        with self.lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._subs.clear()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    # -- watches ------------------------------------------------------------------
    def add(self, dir_fd: int, token: object, cb: Callback) -> int:
        """Watch the directory dir_fd refers to (through /proc/self/fd: never a path a job
        can swap); returns the watch descriptor. OSError (ENOSPC: no watches left)."""
        with self.lock:
            self.start()
            wd = self.libc.add(self._fd, f"/proc/self/fd/{dir_fd}".encode(), MASK)
            if wd < 0:
                raise _os_error("inotify_add_watch")
            self._subs.setdefault(wd, {})[token] = cb
            return wd

    def remove(self, wd: int, token: object) -> None:
        with self.lock:
            subs = self._subs.get(wd)
            if subs is None:
                return
            subs.pop(token, None)
            if not subs:
                del self._subs[wd]
                if self._fd >= 0:
                    self.libc.rm(self._fd, wd)      # EINVAL when the kernel dropped it already

    def watches(self) -> int:
        with self.lock:
            return len(self._subs)

    # -- the reader thread -----------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._read_loop()
                return
            except BaseException:        # noqa: B036 -- whatever ended the loop: contained
                if self._stopping.is_set():
                    return
                self.restarts += 1
                log.exception("checkpoint watcher: reader loop failed; started again")
                self._broadcast(IN_Q_OVERFLOW)      # events may be lost: every job rescans

    def _read_loop(self) -> None:
        poller = select.poll()
        with self.lock:
            fd = self._fd
        if fd < 0:
            return
        poller.register(fd, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(500):
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.EBADF and self._stopping.is_set():
                    return
                raise
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        off = 0
        while off + _EVENT.size <= len(data):
            wd, mask, _cookie, n = _EVENT.unpack_from(data, off)
            name = data[off + _EVENT.size: off + _EVENT.size + n].rstrip(b"\0")
            off += _EVENT.size + n
            if mask & IN_Q_OVERFLOW:
                self._broadcast(IN_Q_OVERFLOW)
                continue
            with self.lock:
                subs = list(self._subs.get(wd, {}).values())
                if mask & IN_IGNORED:
                    self._subs.pop(wd, None)       # the kernel removed it (dir gone)
            for cb in subs:
                self._call(cb, wd, mask, os.fsdecode(name))

    def _broadcast(self, mask: int) -> None:
        with self.lock:
            subs = [cb for s in self._subs.values() for cb in s.values()]
        for cb in {id(c): c for c in subs}.values():
            self._call(cb, -1, mask, "")

    @staticmethod
    def _call(cb: Callback, wd: int, mask: int, name: str) -> None:
        try:
            cb(wd, mask, name)
        except Exception:
            # one watcher's failure is its own: the others keep being told
            log.exception("checkpoint watcher callback failed")


ObserverHub = InotifyHub      # the name tests and benches use

_shared_hub: InotifyHub | None = None
_shared_lock = threading.Lock()


def shared_hub() -> InotifyHub:
    global _shared_hub
    with _shared_lock:
        if _shared_hub is None:
            _shared_hub = InotifyHub()
        return _shared_hub


def _open_dir(path: str, dir_fd: int | None = None) -> int | None:
    """An fd on a real directory (never through a symlink), or None: the configured path
    (its last component not followed), or a name beneath dir_fd (jobfile's rules)."""
    try:
        return open_entry_dir(path) if dir_fd is None else open_dir(dir_fd, path)
    except (OSError, Invalid):
        return None


class CheckpointWatcher:
    def __init__(self, ckpt_dir, on_change: Callable[[str], None], hub: InotifyHub | None = None,
                 sub_watches: int = SUB_WATCHES, sub_depth: int = SUB_DEPTH):
        self.path = os.path.abspath(os.fspath(ckpt_dir))
        self.parent = os.path.dirname(self.path)
        self.base = os.path.basename(self.path)
        self.on_change = on_change
        self.hub = hub if hub is not None else shared_hub()
        self.sub_budget = sub_watches
        self.sub_depth = sub_depth
        self._lock = self.hub.lock
        self._running = False
        self._parent_wd: int | None = None
        self._dir_wd: int | None = None
        self._subs: OrderedDict[int, tuple[int, str]] = OrderedDict()   # wd -> (depth, rel), oldest first
        self._token = object()

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
            self.hub.start()
            pfd = _open_dir(self.parent)
            if pfd is not None:
                try:
                    self._parent_wd = self.hub.add(pfd, self._token, self._on_parent_event)
                except OSError as e:
                    log.warning("cannot watch %s (%s)", self.parent, e)
                finally:
                    os.close(pfd)
            self._arm_dir()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._disarm()
            if self._parent_wd is not None:
                self.hub.remove(self._parent_wd, self._token)
                self._parent_wd = None

    @property
    def armed(self) -> bool:
        return self._dir_wd is not None

    def watch_count(self) -> int:
        with self._lock:
            return (self._dir_wd is not None) + (self._parent_wd is not None) + len(self._subs)

    # -- arming -----------------------------------------------------------------------
    def _disarm(self) -> None:
        if self._dir_wd is not None:
            self.hub.remove(self._dir_wd, self._token)
            self._dir_wd = None
        for wd in list(self._subs):
            self.hub.remove(wd, self._token)
        self._subs.clear()

    def _arm_dir(self) -> None:
        # caller holds self._lock
        self._disarm()
        fd = _open_dir(self.path)       # a symlink is refused: we would watch someone else's dir
        if fd is None:
            return
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                return
            try:
                self._dir_wd = self.hub.add(fd, self._token, self._on_dir_event)
            except OSError as e:
                log.warning("cannot watch %s (%s); relying on the periodic rescan", self.path, e)
                return
            self._arm_below(fd, "", 1)
        finally:
            os.close(fd)

    def _arm_below(self, fd: int, rel: str, depth: int, evict: bool = False) -> None:
        """Watches on the dirs below fd (at `rel`), newest first, within the budget
        (breadth first, never into a dot-dir, never deeper than sub_depth). evict: a tree
        that just appeared takes the places of the oldest watches (at most the budget)."""
        level = [(fd, rel, depth)]
        opened: list[int] = []
        added = 0

        def room() -> bool:
            return added < self.sub_budget if evict else len(self._subs) < self.sub_budget
        try:
            while level and room():
                nxt: list[tuple[int, str, int]] = []
                for dfd, drel, d in level:
                    try:
                        names = listdir(dfd, 4 * self.sub_budget)[0]
                    except OSError:
                        continue
                    dirs = sorted(((st.st_mtime, n) for n, st in names
                                   if st is not None and stat.S_ISDIR(st.st_mode) and not n.startswith(".")),
                                  reverse=True)
                    for _, n in dirs:
                        if not room():
                            return
                        cfd = _open_dir(n, dfd)
                        if cfd is None:
                            continue
                        opened.append(cfd)
                        crel = f"{drel}/{n}" if drel else n
                        if self._watch_sub(cfd, crel, d):
                            added += 1
                            if d < self.sub_depth:
                                nxt.append((cfd, crel, d + 1))
                level = nxt
        finally:
            for o in opened:
                os.close(o)

    def _watch_sub(self, fd: int, rel: str, depth: int) -> bool:
        cb: Callback = lambda wd, mask, name: self._on_sub_event(wd, mask, name)
        try:
            wd = self.hub.add(fd, self._token, cb)
        except OSError:
            return False        # ENOSPC: the host's watches are spent; the rescan covers it
        if wd == self._dir_wd or wd == self._parent_wd:
            return False
        self._subs[wd] = (depth, rel)
        self._subs.move_to_end(wd)
        while len(self._subs) > self.sub_budget:
            old, _ = self._subs.popitem(last=False)     # the oldest gives way to the newest
            self.hub.remove(old, self._token)
        return True

    # -- events -----------------------------------------------------------------------
    def _on_dir_event(self, _wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.on_change("changed")
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            return  # the parent watch reports it with context
        if mask & IN_IGNORED:
            with self._lock:
                self._dir_wd = None
            return
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and not name.startswith("."):
            self._watch_new(name, 1)
        self.on_change("changed")

    def _on_sub_event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_IGNORED:
            with self._lock:
                self._subs.pop(wd, None)        # its dir went: the slot is free again
            return
        if mask & IN_Q_OVERFLOW:
            self.on_change("changed")
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            return
        if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and not name.startswith("."):
            with self._lock:
                where = self._subs.get(wd)
            if where is not None and where[0] < self.sub_depth:
                self._watch_new(f"{where[1]}/{name}", where[0] + 1)
        self.on_change("changed")

    def _watch_new(self, rel: str, depth: int) -> None:
        """A dir that appeared below the checkpoint dir: watched (the oldest watch gives
        way past the budget), with what it already holds (a tree moved in whole)."""
        with self._lock:
            if not self._running or self._dir_wd is None or depth > self.sub_depth:
                return
            top = _open_dir(self.path)
            if top is None:
                return
            try:
                try:
                    cfd = open_dir(top, rel)      # beneath the dir: no symlink in any component
                except OSError:
                    return
                try:
                    if self._watch_sub(cfd, rel, depth) and depth < self.sub_depth:
                        self._arm_below(cfd, rel, depth + 1, evict=True)
                finally:
                    os.close(cfd)
            finally:
                os.close(top)

    def _on_parent_event(self, _wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            with self._lock:
                if self._running:
                    self._arm_dir()
            self.on_change("changed")
            return
        if name != self.base:
            return
        if mask & (IN_MOVED_FROM | IN_MOVED_TO):
            reason = "dir-moved"
        elif mask & IN_CREATE:
            reason = "dir-created"
        elif mask & IN_DELETE:
            reason = "dir-deleted"
        else:
            return
        with self._lock:
            if self._running:
                self._arm_dir()
        self.on_change(reason)
