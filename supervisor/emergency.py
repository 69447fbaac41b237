"""Emergency saves for any training loop: the save signal as a flag, the notice, atomic writes.

No framework is imported here (the daemon imports trainsup); `atomic_save` imports torch
only when it is called. A plain PyTorch script needs two lines:

    if trainsup.save_requested():                 # once per step: a flag check
        trainsup.atomic_save(state, "ckpt/last.pt")   # tmp + fsync + rename + dir fsync

`save_requested()` installs the handlers on its first call: the save signal
(TRAINSUP_SAVE_SIGNAL, default SIGUSR1) and SIGTERM. The handlers only set a flag; saving
inside a handler can deadlock. The daemon writes a *notice* before it signals
(TRAINSUP_NOTICE_FILE, JSON {"id", "kind": "checkpoint"|"preempt", "deadline",
"deadline_iso"}): after a `preempt` save the job is not needed any more, so `atomic_save`
ends the process with exit 0 (one save per preemption; the daemon sees the exit instead of
sending SIGTERM). After SIGTERM it saves and exits 143 (128+SIGTERM), so a stop from
outside the daemon is a restartable crash, never a "finished" run.

Integrations call `take()` (the pending request, or None) and `served(request)`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

from . import contract

__all__ = ["Request", "save_requested", "take", "served", "current", "should_stop", "install", "flags",
           "atomic_save", "atomic_write", "read_notice", "NOTICE_ENV", "fsync_dir", "fsync_files"]

NOTICE_ENV = contract.NOTICE_FILE
ACK_SUFFIX = contract.ACK_SUFFIX
TERM_EXIT = 128 + signal.SIGTERM
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Request:
    """What the job was asked for. kind: `checkpoint` (save and go on), `preempt` (save,
    then exit 0: the daemon stops the job), `terminate` (SIGTERM: save, then exit 143)."""

    kind: str
    deadline: float | None = None     # wall clock (epoch seconds), when the daemon knows it
    id: str | None = None

    @property
    def stops(self) -> bool:
        return self.kind in ("preempt", "terminate")

    @property
    def exit_code(self) -> int | None:
        return 0 if self.kind == "preempt" else TERM_EXIT if self.kind == "terminate" else None

    def time_left(self) -> float | None:
        """Seconds to the deadline (wall clock: it comes from another process), or None."""
        return None if self.deadline is None else self.deadline - time.time()


def _log(msg: str) -> None:
    print(f"trainsup: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# The notice file
# ---------------------------------------------------------------------------------


def read_notice(path: PathLike | None = None) -> Request | None:
    """The daemon's latest notice, or None (no notice file, or one this code cannot read:
    then the signal alone says "checkpoint")."""
    p = path or os.environ.get(NOTICE_ENV)
    if not p:
        return None
    try:
        with open(p, "rb") as f:
            raw = f.read(contract.MAX_NOTICE_BYTES)
    except OSError:
        return None
    parsed = contract.parse_notice(raw)
    if parsed is None:
        return None
    notice_id, kind, deadline = parsed
    return Request(kind, deadline, notice_id)


def _ack(req: Request, path: Path | None = None, state: str = "saved") -> None:
    """Tell the daemon which notice the job took ("taken") or saved for ("saved"), and
    whether it exits after that save, so the daemon waits for the exit of a job that saved
    for a preemption instead of sending SIGTERM (which would ask for a second save)."""
    notice = os.environ.get(NOTICE_ENV)
    if not notice or req.id is None:
        return
    body = contract.ack_body(req.id, req.kind, state, req.stops, os.getpid(),
                             str(Path(path).absolute()) if path is not None else None)
    try:
        _write_bytes_atomic(Path(notice + ACK_SUFFIX), json.dumps(body).encode(), sync=False)
    except OSError as e:
        _log(f"cannot acknowledge the notice in {notice}{ACK_SUFFIX}: {e.strerror}")


# ---------------------------------------------------------------------------------
# Signal flags (the handlers do nothing else)
# ---------------------------------------------------------------------------------


class _Flags:
    def __init__(self) -> None:
        self.events = 0             # save signals and SIGTERMs received: one read tells "anything new"
        self.save_count = 0         # save signals received
        self.save_seen = 0          # save signals turned into requests
        self.term = False           # SIGTERM received
        self.term_seen = False
        self.installed = False
        self.prev: dict[int, Any] = {}
        self.current: Request | None = None   # the request being served
        self.stop: Request | None = None      # a stopping request that was saved
        self.current_saved = False               # the current request has a save already


_f = _Flags()
# True until the first call: that call takes the slow path and installs the handlers.
_pending = True


def _chain(sig: int, frame: Any) -> None:
    prev = _f.prev.get(sig)
    if callable(prev) and prev is not signal.default_int_handler:
        prev(sig, frame)


def _on_save_signal(sig: int, frame: Any) -> None:
    global _pending
    _f.save_count += 1
    _f.events += 1
    _pending = True
    _chain(sig, frame)


def _on_sigterm(sig: int, frame: Any) -> None:
    global _pending
    _f.term = True
    _f.events += 1
    _pending = True
    _chain(sig, frame)


def save_signal_number() -> int:
    return contract.signal_number(os.environ.get(contract.SAVE_SIGNAL))


def flags() -> _Flags:
    """The process's signal counts (read them, never write them): `training.Checkpointer`
    keeps its own served/seen marks against these instead of installing handlers of its
    own, so the process has one owner of its save signal whichever API a script uses."""
    return _f


def install(*, sigterm: bool = True, save_signal: bool = True) -> bool:
    """Catch the save signal (and SIGTERM) with flag-setting handlers; idempotent.
    Returns False off the main thread (Python delivers signals to the main thread only)."""
    if _f.installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        _log("save_requested() first called off the main thread: no signal handlers installed")
        return False
    pairs = [(save_signal_number(), _on_save_signal)] if save_signal else []
    if sigterm:
        pairs.append((signal.SIGTERM, _on_sigterm))
    for sig, fn in pairs:
        _f.prev[sig] = signal.signal(sig, fn)
    _f.installed = True
    return True


def install_sigterm_only() -> bool:
    """Catch SIGTERM only (the save signal belongs to someone else, e.g. Lightning under SLURM)."""
    return install(sigterm=True, save_signal=False)


def uninstall() -> None:
    """Put the previous handlers back (tests, and code that hands signals to a framework)."""
    global _pending
    if _f.installed and threading.current_thread() is threading.main_thread():
        for sig, prev in _f.prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    _f.prev.clear()
    _f.installed = False
    _pending = True


def save_requested() -> bool:
    """True once per request (save signal or SIGTERM) since the last call; the first call
    installs the handlers. Nothing pending costs one global read."""
    return _pending and _take_slow() is not None


def take() -> Request | None:
    """The pending request (consumed), or None. Reads the notice only when signalled."""
    return _take_slow() if _pending else None


def _take_slow() -> Request | None:
    global _pending
    if not _f.installed:
        install()
    _pending = False
    req: Request | None = None
    if _f.term and not _f.term_seen:
        _f.term_seen = True
        req = Request("terminate")
    elif _f.save_count != _f.save_seen:
        _f.save_seen = _f.save_count
        # The daemon writes the notice before it signals; a missing or unreadable one
        # means a plain "checkpoint" (an older daemon, or `kill -USR1` by hand).
        req = read_notice() or Request("checkpoint")
        _ack(req, state="taken")
    if req is None:
        return None
    if _f.current is not None and _f.current.stops and not req.stops:
        req = _f.current              # a stop not yet saved is not downgraded
    if req is not _f.current:
        _f.current_saved = False
    _f.current = req
    return req


def current() -> Request | None:
    """The request taken last and not yet served (its deadline tells how long a save may take)."""
    return _f.current


def should_stop() -> bool:
    """A preemption or SIGTERM was served by a save: the loop should end now."""
    cur = _f.current
    return _f.stop is not None or (cur is not None and cur.stops and _f.current_saved)


def served(req: Request | None = None, path: PathLike | None = None, *,
           exit: bool = False) -> int | None:
    """Record that `req` (default: the current request) was saved to `path`. Returns the
    exit code the job should end with (0 after a preempt, 143 after SIGTERM), None to go on;
    with exit=True it exits with it."""
    req = req or _f.current
    if req is None:
        return None
    if _f.current is req:
        _f.current = None
        _f.current_saved = False
    _ack(req, Path(path) if path is not None else None)
    if not req.stops:
        return None
    _f.stop = req
    code = req.exit_code
    if exit:
        _log(f"saved {path} for {'preemption' if req.kind == 'preempt' else 'SIGTERM'}; exiting {code}")
        sys.stdout.flush()
        raise SystemExit(code)
    return code


def _reset_for_tests() -> None:
    global _pending
    uninstall()
    _f.__dict__.update(_Flags().__dict__)
    _pending = True


# ---------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------


def fsync_dir(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: list[Path]) -> None:
    """fsync each of `paths`, after all were written: on ext4 (data=ordered) the first
    fsync's journal commit writes every file's data, and the rest find little to do."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tmp_name(path: Path) -> Path:
    # A dot name in the same dir: never taken for a checkpoint, and the rename stays on
    # one filesystem (a temp file in $TMPDIR would make the final move a non-atomic copy).
    return path.parent / f".{path.name}.tmp.{os.getpid()}"


def _replace_atomically(path: PathLike, fill: Callable[[Path], object], sync: bool) -> Path:
    """The one commit protocol: fill a temp file next to `path`, fsync it, rename it over
    `path`, fsync the dir; on any failure the temp file goes and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        fill(tmp)
        if sync:
            fsync_files([tmp])
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if sync:
        fsync_dir(path.parent)
    return path


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], object], *, sync: bool = True) -> Path:
    """Write `path` through `write(fileobj)` into a temp file next to it, fsync, rename over
    `path`, fsync the dir. A reader (or a kill at any moment) sees the old file or the new."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)
    return _replace_atomically(path, fill, sync)


def atomic_write_path(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Like atomic_write for a writer that takes a file name (torch.save, paddle.save,
    save_weights write through their own buffered writers, faster than a Python file)."""
    return _replace_atomically(path, write, True)


def _write_bytes_atomic(path: Path, data: bytes, sync: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), sync=sync)


def atomic_save(obj: Any, path: PathLike, *, exit_after_stop: bool = True, **torch_save_kw: Any) -> Path:
    """torch.save(obj, path), atomically (tmp + fsync + rename + dir fsync).

    When this save serves a preemption notice or SIGTERM taken by `save_requested()`, the
    process ends right after the commit (exit 0, resp. 143) unless exit_after_stop=False
    (a script that writes several files per request passes it to all but the last, or
    checks `trainsup.should_stop()` itself)."""
    import torch  # only here: `import trainsup` must not import torch

    p = atomic_write_path(path, lambda tmp: torch.save(obj, str(tmp), **torch_save_kw))
    if _f.current is not None:
        if exit_after_stop:
            served(_f.current, p, exit=True)
        else:
            _f.current_saved = True   # served by the caller's last save, or should_stop()
    return p
