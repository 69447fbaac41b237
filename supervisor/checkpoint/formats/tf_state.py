"""TF's `checkpoint` state file, kept true while rotation deletes: it must never list a
deleted checkpoint (`manager.latest_checkpoint`, `tf.train.latest_checkpoint` read it), so
it is rewritten before the checkpoint's files go, the way TF writes it (temp file, fsync,
rename, fsync dir), and re-read afterwards in case TF committed a save meanwhile.

CheckpointManager writes the file from the list it keeps in memory: its next save lists
again what rotation deleted (with max_to_keep=None, forever). `forget_missing` drops the
names whose files are gone; every rotation pass runs it."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from typing import Any

from ..jobfile import Invalid, create_exclusive, read_capped

STATE_FILE = "checkpoint"        # TF's state file: which prefixes are committed, newest last
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


class NotAStateFile(Exception):
    """The state file is not a regular file of a sane size (a planted FIFO): left alone."""


def _read_state(dir_fd: int, name: str) -> str | None:
    # Never a wait: found, a FIFO named `checkpoint` blocked the rotation pass here.
    try:
        return read_capped(dir_fd, name, "tf_state").decode("utf-8", "replace")
    except Invalid as e:
        if str(e).startswith("missing "):
            return None
        raise NotAStateFile(str(e)) from None


def _write_synced(dir_fd: int, name: str, text: str) -> None:
    # Created, never opened: a FIFO planted under the temp name would block a write.
    try:
        fd = create_exclusive(dir_fd, name)
    except FileExistsError:
        os.unlink(name, dir_fd=dir_fd)      # ours from a killed run, or planted: either way not read
        fd = create_exclusive(dir_fd, name)
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
    try:
        return _forget(dir_fd, gone)
    except NotAStateFile:
        # A FIFO, a socket, a 2 GB file named `checkpoint`: not TF's state file, so nothing
        # to keep true; never a wait, never a reason to keep the entry.
        return False


def _forget(dir_fd: int, gone: list[str]) -> bool:
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


def listed_names(text: str) -> list[str]:
    """The checkpoint names the state file lists (latest and all), as written."""
    out = []
    for k, v in _state_lines(text):
        if k in ("model_checkpoint_path", "all_model_checkpoint_paths"):
            out.append(v.strip('"'))
    return out


def forget_missing(dir_fd: int) -> list[str]:
    """Drop from `checkpoint` every name it lists whose `.index` is not in the dir (deleted,
    then listed again by CheckpointManager's next save). Only names relative to the dir
    (what CheckpointManager writes): an absolute path may name a checkpoint elsewhere.
    Returns the names dropped."""
    try:
        text = _read_state(dir_fd, STATE_FILE)
    except NotAStateFile:
        return []       # a FIFO or a huge file under the name: not TF's, nothing to repair
    if text is None:
        return []
    gone = []
    for name in dict.fromkeys(listed_names(text)):
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            continue
        try:
            os.stat(f"{name}.index", dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            gone.append(name)
    if gone and forget_in_tf_state(dir_fd, gone):
        return gone
    return []


def write_state_if_absent(dir_fd: int, base: str) -> bool:
    """A state file naming `base` as the newest (and only) checkpoint, written the way TF
    writes it (temp, fsync, rename), only where none exists. True when written."""
    if "/" in base or "\0" in base or base in ("", ".", ".."):
        return False
    try:
        os.stat(STATE_FILE, dir_fd=dir_fd, follow_symlinks=False)
        return False                # TF's own (or anything under the name): left alone
    except FileNotFoundError:
        pass
    tmp = f"{STATE_FILE}.tmp{os.getpid()}"
    _write_synced(dir_fd, tmp, f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n')
    try:
        os.link(tmp, STATE_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)   # never over one made meanwhile
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp, dir_fd=dir_fd)
    os.fsync(dir_fd)
    return True
