"""TF's `checkpoint` state file, kept true while rotation deletes: it must never list a
deleted checkpoint (`manager.latest_checkpoint`, `tf.train.latest_checkpoint` read it), so
it is rewritten before the checkpoint's files go, the way TF writes it (temp file, fsync,
rename, fsync dir), and re-read afterwards in case TF committed a save meanwhile."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from typing import Any

STATE_FILE = "checkpoint"        # TF's state file: which prefixes are committed, newest last
_MAX_STATE = 16 << 20
_RENAME_EXCHANGE = 2
_MAX_ROUNDS = 20      # TF saving faster than a rewrite every round: its next save lists what it has


def _state_lines(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            out.append((key.strip(), val.strip()))
    return out


def tf_state_without(text: str, removed: Iterable[str]) -> str | None:
    """The state file's text with `removed` prefixes dropped (None: nothing to change).

    all_model_checkpoint_paths and all_model_checkpoint_timestamps are parallel lists;
    model_checkpoint_path moves to the newest remaining path when its own goes.
    """
    gone = set(removed)
    lines = _state_lines(text)
    paths = [v for k, v in lines if k == "all_model_checkpoint_paths"]
    stamps = [v for k, v in lines if k == "all_model_checkpoint_timestamps"]
    latest = next((v for k, v in lines if k == "model_checkpoint_path"), None)

    def base(v: str) -> str:
        return os.path.basename(v.strip('"'))

    if not any(base(v) in gone for v in paths + ([latest] if latest else [])):
        return None
    keep = [k for k, v in enumerate(paths) if base(v) not in gone]
    paths2 = [paths[k] for k in keep]
    stamps2 = [stamps[k] for k in keep if k < len(stamps)] if len(stamps) == len(paths) else stamps
    if latest is not None and base(latest) in gone:
        latest = paths2[-1] if paths2 else None
    out = []
    if latest is not None:
        out.append(f"model_checkpoint_path: {latest}")
    out += [f"all_model_checkpoint_paths: {v}" for v in paths2]
    out += [f"all_model_checkpoint_timestamps: {v}" for v in stamps2]
    out += [f"{k}: {v}" for k, v in lines if k not in (
        "model_checkpoint_path", "all_model_checkpoint_paths", "all_model_checkpoint_timestamps")]
    return "\n".join(out) + "\n"


def _read_state(dir_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, _MAX_STATE).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _write_synced(dir_fd: int, name: str, text: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: Any = None


def _exchange(dir_fd: int, a: str, b: str) -> bool:
    """renameat2(RENAME_EXCHANGE): swap two names at once. False where the kernel, the C
    library or the filesystem cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    if _libc(dir_fd, a.encode(), dir_fd, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


def forget_in_tf_state(dir_fd: int, removed: Iterable[str]) -> bool:
    """Rewrite `checkpoint` in the dir of dir_fd without `removed`; True if it changed.

    TF rewrites the file (temp + rename) at every save while the job runs, so a plain read,
    rewrite, rename would put back an older text over a save TF committed in between: the
    newest save would read as not committed. The rewrite is swapped in instead
    (RENAME_EXCHANGE), and when what comes out is not the text it was made from, TF wrote
    meanwhile: that text is rewritten in its turn. Without RENAME_EXCHANGE the file is read
    again just before the rename (a window of microseconds instead of an fsync)."""
    gone = list(removed)
    base = _read_state(dir_fd, STATE_FILE)
    if base is None:
        return False
    new = tf_state_without(base, gone)
    if new is None:
        return False
    tmp = f"{STATE_FILE}.tmp{os.getpid():x}"
    changed = False
    try:
        for _ in range(_MAX_ROUNDS):
            _write_synced(dir_fd, tmp, new)
            try:
                swapped = _exchange(dir_fd, tmp, STATE_FILE)
            except FileNotFoundError:
                break                             # no state file any more: nothing lists anything
            if not swapped:
                now = _read_state(dir_fd, STATE_FILE)
                if now is not None and now != base:
                    base, new = now, tf_state_without(now, gone) or now
                    continue
                os.rename(tmp, STATE_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                changed = True
                break
            changed = True
            out = _read_state(dir_fd, tmp)        # what was `checkpoint` an instant ago
            os.unlink(tmp, dir_fd=dir_fd)
            if out is None or out == base:
                break
            # TF committed a save after the read: its text goes back in, without `removed`
            base, new = new, tf_state_without(out, gone) or out
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    os.fsync(dir_fd)
    return changed
