"""PyTorch Lightning `.ckpt` files, where ModelCheckpoint puts them by default.

Default dirpath: `<root>/lightning_logs/version_<k>/checkpoints/` (every version is
listed: a resumed run writes into a new version, and one that crashed before its first
save must not hide the previous version's checkpoints). Names: `epoch=E-step=S.ckpt`
(step S), `last.ckpt`, `last-vN.ckpt` (name clashes), `hpc_ckpt_N.ckpt` (SLURM). A `.ckpt`
is a torch.save zip, checked like any torch zip. A step not in the name (last, hpc) comes
from `global_step` in data.pkl, read as a symbolic opcode stream, never unpickled.

save_last="link" makes `last.ckpt` a symlink to a sibling: an alias of that sibling, valid
when the sibling is. A link that leaves the dir is never followed and is reported.

Metrics for keep_best come from the name only (never unpickled): ModelCheckpoint's
`filename="{epoch}-{step}-{val_loss:.2f}"` writes `epoch=1-step=8-val_loss=0.31.ckpt`, so
every `key=number` field but epoch/step is a metric (`val_loss=0.31`, `val/acc=0.9` is
written `val_acc=0.9` or with the `/`-free name the user chose).

Bookkeeping: every ModelCheckpoint keeps its best k files, `best_model_path` and
`last_model_path` in its state, which every `.ckpt` carries (`callbacks` in data.pkl).
Rotation keeps the files the newest `.ckpt` names there, by path: best_model_path and
last_model_path as pins (`protected_steps`: deleting them breaks
`trainer.validate(ckpt_path="best")` and a resume from "last"), the rest of the best k
above keep_last but below a quota (`kept_by_framework`: with save_top_k=-1 and a monitor
every save is in it). Read from the opcode stream (readers/pickle_values.py), never
unpickled.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import LIMITS, Invalid, Verdict
from .group import FILE, LINK, Group, Listing, Looking, Opened, join
from .readers.pickle_values import NotPlain, plain_values
from .readers.zip import check_torch_fd

LOGS_DIR = "lightning_logs"
_VERSION_RE = re.compile(r"^version_(\d+)$")
_STEP_RE = re.compile(r"(?:^|-)step=(\d+)")
_LAST_RE = re.compile(r"^last(-v\d+)?\.ckpt$")
_NAMED_RE = re.compile(r"(^|-)(epoch|step)=\d+|^hpc_ckpt_\d+\.ckpt$")
_MAX_DATA_PKL = LIMITS["lightning_state"]   # data.pkl holds structure; tensors are apart
_PINNED = ("best_model_path", "last_model_path")
# `key=number`, bounded by `-`, the `-vN` clash suffix or the end; a leading `-` after `=`
# is a negative value (`val_loss=-0.12`), not a separator.
_FIELD_RE = re.compile(r"(?:^|-)([A-Za-z_][\w.]*?)=(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?=-|$)")
_CLASH_RE = re.compile(r"-v\d+$")


NAME = "lightning"
KIND = "group"
STEM_SUFFIXES = (".ckpt",)
AUTO_CLAIMS_ALL = True              # every .ckpt it recognises is a save (it checks names itself)


def skips_dir(name: str) -> bool:
    return name == LOGS_DIR             # its checkpoints dirs come from extra_dirs


def extra_dirs(listing_of: Any, root: Listing) -> list[str]:
    return checkpoint_dirs(listing_of, root)


def checkpoint_dirs(listing_of, root: Listing) -> list[str]:
    """`lightning_logs/version_N/checkpoints` dirs under the root, oldest version first."""
    if root.get(LOGS_DIR) != "d":
        return []
    out = []
    logs = listing_of(LOGS_DIR)
    for name in sorted((n for n, k in logs.items() if k == "d" and _VERSION_RE.match(n)),
                       key=lambda n: int(_VERSION_RE.match(n).group(1))):  # type: ignore[union-attr]
        rel = f"{LOGS_DIR}/{name}"
        if listing_of(rel).get("checkpoints") == "d":
            out.append(f"{rel}/checkpoints")
    return out


def is_lightning_name(name: str) -> bool:
    return bool(_LAST_RE.match(name) or _NAMED_RE.search(name))


def recognise(where: Looking) -> list[Group]:
    d, listing, readlink = where.dir, where.listing, where.readlink
    every_ckpt = where.explicit or where.lightning_dir
    groups = []
    for name, kind in sorted(listing.items()):
        if name.startswith(".") or not name.endswith(".ckpt"):
            continue
        if not (every_ckpt or is_lightning_name(name)):
            continue
        alias = "last" if _LAST_RE.match(name) else None
        if kind == FILE:
            groups.append(Group(join(d, name), "lightning", (join(d, name),), resume=join(d, name), alias=alias))
        elif kind == LINK:
            target = readlink(join(d, name))
            groups.append(Group(join(d, name), "lightning", (join(d, name),), resume=join(d, name),
                                alias=alias or "link", link_to=target))
    return groups


def step_from_name(name: str) -> int | None:
    m = _STEP_RE.search(name)
    return int(m.group(1)) if m else None


def metrics_from_name(name: str) -> dict[str, float]:
    """`{"val_loss": 0.31}` from `epoch=1-step=8-val_loss=0.31.ckpt`; epoch/step are not metrics."""
    stem = name[: -len(".ckpt")] if name.endswith(".ckpt") else name
    stem = _CLASH_RE.sub("", stem)
    out: dict[str, float] = {}
    for key, value in _FIELD_RE.findall(stem):
        if key in ("epoch", "step"):
            continue
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def check(root_fd: int, g: Group, sibling_kinds: Listing) -> Verdict:
    base = g.name.rsplit("/", 1)[-1]
    step = step_from_name(base)
    if g.link_to is not None or g.alias == "link":
        t = g.link_to or ""
        # Only a plain sibling name: never followed out of the dir, never through a chain.
        if not t or "/" in t or t in (".", "..") or sibling_kinds.get(t) != FILE:
            return Verdict("lightning", False, f"symlink to {t!r}: not a checkpoint file next to it "
                                               f"(never followed)", step)
        inner = Group(join(g.dir, t), "lightning", (join(g.dir, t),), resume=join(g.dir, t))
        v = check(root_fd, inner, sibling_kinds)
        return Verdict("lightning", v.valid, v.invalid_reason and f"links to {t}: {v.invalid_reason}",
                       v.step, v.epoch, metrics=v.metrics)
    try:
        with Opened(root_fd, g.name) as (fd, st):
            check_torch_fd(fd, st.st_size)
            found = _global_step(fd) if step is None or g.alias else None
    except Invalid as e:
        return Verdict("lightning", False, str(e), step)
    if found is not None:
        step = found
    return Verdict("lightning", True, None, step, metrics=metrics_from_name(base))


def _data_pkl(fd: int, limit: int) -> bytes | None:
    """The torch zip's data.pkl (the pickle without its tensors), or None past `limit`."""
    with zipfile.ZipFile(os.fdopen(fd, "rb", closefd=False)) as zf:
        pkl = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if not pkl or pkl[0].file_size > limit:
            return None
        return zf.read(pkl[0])


def _global_step(fd: int) -> int | None:
    """`global_step` from data.pkl: the int right after that key string at the top level."""
    data = _data_pkl(fd, _MAX_DATA_PKL)
    if data is None:
        return None
    want = False
    try:
        import pickletools  # at the first Lightning file: not in every daemon
        for op, arg, _ in pickletools.genops(data):
            if want:
                if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    continue
                if op.name in ("BININT", "BININT1", "BININT2", "LONG1") and isinstance(arg, int):
                    return arg
                want = False
            if arg == "global_step":
                want = True
    except ValueError:
        return None
    return None


# ------------------------------------------------------------------ bookkeeping

# (path, dev, ino, size, mtime_ns) of a .ckpt -> what its ModelCheckpoint states name:
# a rotation pass re-reads data.pkl only when the newest .ckpt changed.
_Tracked = tuple[frozenset[str], frozenset[str]]
_tracked_cache: dict[tuple, _Tracked] = {}
_CACHE_MAX = 64
_NOTHING: _Tracked = (frozenset(), frozenset())


def protected_steps(root_fd: int, infos: Sequence[Any]) -> set[Any]:
    """The entries (absolute paths) the newest valid `.ckpt`'s ModelCheckpoint state names
    as `best_model_path` or `last_model_path`: never deleted, not even for a quota
    (`trainer.validate(ckpt_path="best")` and a resume from "last" load them)."""
    return _entries(infos, _tracked(root_fd, infos)[0])


def kept_by_framework(root_fd: int, infos: Sequence[Any]) -> set[Any]:
    """The rest of ModelCheckpoint's best k (`best_k_models`): kept by rotation however
    tight keep_last is, given up under quota pressure before keep_last (Lightning's own
    rotation tolerates a file of its best k that is gone)."""
    pins, best_k = _tracked(root_fd, infos)
    return _entries(infos, best_k - pins)


def _tracked(root_fd: int, infos: Sequence[Any]) -> _Tracked:
    mine = [i for i in infos if i.format == NAME and i.valid and not getattr(i, "in_progress", False)
            and getattr(i, "alias_kind", None) != "link" and getattr(i, "link_to", None) is None]
    if not mine:
        return _NOTHING
    return _tracked_paths(root_fd, max(mine, key=lambda i: (i.step if i.step is not None else -1, i.mtime)))


def _entries(infos: Sequence[Any], tracked: frozenset[str]) -> set[Any]:
    """The Lightning entries `tracked` names: by absolute path, or by the name relative to
    the checkpoint dir (the dir seen under another path: a bind mount, a moved tree)."""
    if not tracked:
        return set()
    # tracked paths by file name: an entry is compared with the paths of its own name only
    # (a state naming 100,000 files against 10,000 entries was 10^9 comparisons), in memory
    # linear in the state
    by_name: dict[str, list[str]] = {}
    for t in tracked:
        by_name.setdefault(t.rpartition("/")[2], []).append(t)
    return {Path(i.path) for i in infos if i.format == NAME and (
        str(i.path) in tracked
        or any(t.endswith("/" + i.name) for t in by_name.get(i.name.rpartition("/")[2], ())))}


def _tracked_paths(root_fd: int, info: Any) -> _Tracked:
    name = str(info.name)
    path = str(info.path)
    try:
        # through the job's held dir (jobfile: never a FIFO, never out of the dir)
        with Opened(root_fd, name) as (fd, st):
            key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            hit = _tracked_cache.get(key)
            if hit is not None:
                return hit
            data = _data_pkl(fd, _MAX_DATA_PKL)
        found = model_checkpoint_paths(plain_values(data)) if data is not None else _NOTHING
    except (Invalid, OSError, NotPlain, zipfile.BadZipFile, ValueError, EOFError):
        return _NOTHING
    if len(_tracked_cache) >= _CACHE_MAX:
        _tracked_cache.pop(next(iter(_tracked_cache)))
    _tracked_cache[key] = found
    return found


def model_checkpoint_paths(ckpt: Any) -> _Tracked:
    """(best_model_path and last_model_path, every file of the best k) that the
    ModelCheckpoint states in one checkpoint's `callbacks` name."""
    callbacks = ckpt.get("callbacks") if isinstance(ckpt, dict) else None
    pins: set[str] = set()
    best_k: set[str] = set()
    for key, state in (callbacks.items() if isinstance(callbacks, dict) else ()):
        if not (isinstance(key, str) and key.startswith("ModelCheckpoint") and isinstance(state, dict)):
            continue
        k = state.get("best_k_models")
        if isinstance(k, dict):
            best_k.update(p for p in k if isinstance(p, str) and p)
        if isinstance(v := state.get("kth_best_model_path"), str) and v:
            best_k.add(v)
        pins.update(v for k in _PINNED if isinstance(v := state.get(k), str) and v)
    return frozenset(pins), frozenset(best_k)
