"""What rotation must respect so each framework's own bookkeeping keeps working.

- HF Trainer's best checkpoint (`best_model_checkpoint` in the newest trainer_state.json,
  `load_best_model_at_end`): deleting it makes Trainer silently return the last model. Its
  step is protected like a pinned one.
- A multi-file checkpoint is deleted member by member, commit marker first (Paddle's
  `.states`, TF's `.index`): a deletion cut short leaves an entry that reads as invalid,
  never one that looks complete with files missing.
- TF's `checkpoint` state file must never list a deleted checkpoint
  (`manager.latest_checkpoint`, `tf.train.latest_checkpoint` read it): it is rewritten
  first, the way TF writes it (temp file, fsync, rename, fsync dir).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .. import trash
from ..validate import HF_DIR_RE
from .tf import STATE_FILE

_MAX_STATE = 16 << 20
_RENAME_EXCHANGE = 2
_MAX_ROUNDS = 20      # TF saving faster than a rewrite every round: its next save lists what it has


def hf_best_steps(infos: Sequence[Any]) -> set[int]:
    """Steps of the checkpoint HF's newest trainer_state.json names as best (read-only)."""
    newest = next((i for i in reversed(infos) if i.format == "hf" and i.valid), None)
    if newest is None:
        return set()
    try:
        fd = os.open(Path(newest.path) / "trainer_state.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return set()
    try:
        state = json.loads(os.read(fd, _MAX_STATE))
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    finally:
        os.close(fd)
    best = state.get("best_model_checkpoint") if isinstance(state, dict) else None
    m = HF_DIR_RE.match(os.path.basename(str(best).rstrip("/"))) if isinstance(best, str) else None
    return {int(m.group(1))} if m else set()


def deletion_units(info: Any, ckpt_dir: Path) -> list[str]:
    """Paths relative to the checkpoint dir to delete, in order, for one entry."""
    members = getattr(info, "members", ())
    if members:
        return list(members)
    p = Path(info.path)
    return [p.relative_to(ckpt_dir).as_posix() if p.is_relative_to(ckpt_dir) else info.name]


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


def before_delete(ckpt_dir: Path, info: Any) -> None:
    """Framework bookkeeping to update before an entry's files go (TF's state file)."""
    if getattr(info, "format", None) != "tf":
        return
    rel = Path(info.name)
    d = (Path(ckpt_dir) / rel.parent) if str(rel.parent) != "." else Path(ckpt_dir)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        forget_in_tf_state(dfd, [rel.name])
    finally:
        os.close(dfd)


def delete_unit(ckpt_dir: Path, rel: str) -> None:
    """Delete one member through the trash. A member in a framework's nested layout
    (lightning_logs/version_N/checkpoints/, best_model/, a Keras subdir) is deleted with its
    own dir as the root, reached without a symlink in any component."""
    parent, _, base = rel.rpartition("/")
    d = Path(ckpt_dir)
    for comp in parent.split("/") if parent else ():
        d = d / comp
        if not stat.S_ISDIR(os.lstat(d).st_mode):
            raise trash.DeleteError(errno.ELOOP, f"{d}: not a real directory (never followed)")
    trash.delete_entry(d, base)
