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
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

from .common import Invalid, Verdict
from .group import FILE, LINK, Group, Listing, Looking, Opened, join
from .readers.zip import check_torch_fd

LOGS_DIR = "lightning_logs"
_VERSION_RE = re.compile(r"^version_(\d+)$")
_STEP_RE = re.compile(r"(?:^|-)step=(\d+)")
_LAST_RE = re.compile(r"^last(-v\d+)?\.ckpt$")
_NAMED_RE = re.compile(r"(^|-)(epoch|step)=\d+|^hpc_ckpt_\d+\.ckpt$")
_MAX_DATA_PKL = 64 << 20
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


def _global_step(fd: int) -> int | None:
    """`global_step` from data.pkl: the int right after that key string at the top level."""
    with zipfile.ZipFile(os.fdopen(fd, "rb", closefd=False)) as zf:
        pkl = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if not pkl or pkl[0].file_size > _MAX_DATA_PKL:
            return None
        data = zf.read(pkl[0])
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
