"""Checkpoints of other frameworks, daemon side: Paddle, TensorFlow, Keras, Lightning, safetensors.

The index calls `scan(root, fmt, cache)`: it finds each framework's entries where the
framework puts them (the checkpoint dir, its direct subdirs, Lightning's
`lightning_logs/version_N/checkpoints/`), validates each as one unit (a Paddle prefix
group, a TF index + shards, a Keras backup with its metadata) through the verdict cache,
names aliases (`latest`, `best_accuracy`, `last.ckpt`, the Keras backup) and the numbered
checkpoint whose step they share, and returns index.CheckpointInfo records plus the
top-level names it claimed (the index's own scan skips those).

Nothing here imports a framework or unpickles: pickles are walked as opcode streams, TF
bundles as SSTables, HDF5 by its superblock.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..format import STEP_DIR_RE
from ..validate import _NOFOLLOW_DIR, HF_DIR_RE, Verdict, VerdictCache, _Invalid, check_safetensors_fd
from . import keras, lightning, paddle, tf
from .entry import DIR, FILE, Group, Listing, Opened, fingerprint, join, list_dir, numbered, open_dir_under

if TYPE_CHECKING:
    from ..index import CheckpointInfo

NAMES = ("paddle", "tf", "keras", "lightning", "safetensors")
_CACHE_VERSION = "fw2"
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class _Tree:
    """Listings of the dirs a scan looks at, each read once, through O_NOFOLLOW fds."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.cache: dict[str, Listing] = {}
        self.state: dict[str, list[str] | None] = {}

    def listing(self, rel: str) -> Listing:
        if rel not in self.cache:
            try:
                fd = open_dir_under(self.root_fd, rel)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    self.cache[rel] = {}
                    return self.cache[rel]
                raise
            try:
                self.cache[rel] = list_dir(fd)
            finally:
                os.close(fd)
        return self.cache[rel]

    def tf_listed(self, d: str) -> list[str] | None:
        """What dir d's TF `checkpoint` state file lists, read once per scan."""
        if d not in self.state:
            self.state[d] = tf.state_paths(self.root_fd, d, self.listing(d))
        return self.state[d]

    def readlink(self, rel: str) -> str | None:
        d, _, base = rel.rpartition("/")
        try:
            fd = open_dir_under(self.root_fd, d)
        except OSError:
            return None
        try:
            return os.readlink(base, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)


def _search_dirs(tree: _Tree, fmt: str) -> list[tuple[str, bool]]:
    """(dir relative to the root, is a Lightning checkpoints dir), root first."""
    root = tree.listing("")
    out = [("", False)]
    for name, kind in sorted(root.items()):
        if kind != DIR or name.startswith(".") or name == lightning.LOGS_DIR:
            continue
        if HF_DIR_RE.match(name) or STEP_DIR_RE.match(name) or name.endswith("_temp"):
            continue  # entries of their own, not folders of entries
        out.append((name, False))
    if fmt in ("auto", "lightning"):
        out += [(d, True) for d in lightning.checkpoint_dirs(tree.listing, root)]
    return out


def _stem(g: Group) -> str:
    base = g.name.rsplit("/", 1)[-1]
    for suffix in (keras.WEIGHTS, keras.MODEL, ".safetensors", ".ckpt"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _claimed_by_auto(tree: _Tree, g: Group) -> bool:
    """`auto` claims numbered saves and the frameworks' own aliases, nothing else: a file
    it claims may be rotated away, and an export like `final.keras` is not a checkpoint."""
    if g.alias is not None or numbered(_stem(g)):
        return True
    listed = tree.tf_listed(g.dir) if g.format == "tf" else None
    return listed is not None and g.name.rsplit("/", 1)[-1] in listed


def recognise(tree: _Tree, fmt: str) -> list[Group]:
    groups: list[Group] = []
    for d, is_lightning_dir in _search_dirs(tree, fmt):
        listing = tree.listing(d)
        if fmt in ("auto", "paddle"):
            groups += paddle.recognise(d, listing)
        if fmt in ("auto", "tf"):
            groups += tf.recognise(d, listing, explicit=fmt == "tf")
        if fmt in ("auto", "keras"):
            groups += keras.recognise(d, listing)
        if fmt in ("auto", "lightning"):
            groups += lightning.recognise(d, listing, fmt == "lightning" or is_lightning_dir, tree.readlink)
        if fmt in ("auto", "safetensors"):
            groups += [Group(join(d, n), "safetensors", (join(d, n),), resume=join(d, n))
                       for n, k in sorted(listing.items())
                       if k == FILE and n.endswith(".safetensors") and not n.startswith(".")]
    if fmt == "auto":
        groups = [g for g in groups if g.format == "lightning" or _claimed_by_auto(tree, g)]
    return groups


def _check(tree: _Tree, g: Group) -> Verdict:
    listing = tree.listing(g.dir)
    if g.format == "paddle":
        return paddle.check(tree.root_fd, g, paddle.marker_required(g.dir, listing))
    if g.format == "tf":
        return tf.check(tree.root_fd, g)
    if g.format == "keras":
        return keras.check(tree.root_fd, g)
    if g.format == "lightning":
        return lightning.check(tree.root_fd, g, listing)
    return _check_safetensors(tree.root_fd, g)


def _check_safetensors(root_fd: int, g: Group) -> Verdict:
    base = g.name.rsplit("/", 1)[-1]
    m = _NUMBER.search(base[: -len(".safetensors")])
    step = int(m.group(1)) if m else None
    try:
        with Opened(root_fd, g.name) as (fd, st):
            check_safetensors_fd(fd, st.st_size)
    except _Invalid as e:
        return Verdict("safetensors", False, str(e), step)
    return Verdict("safetensors", True, None, step)


def _depends_on(g: Group) -> tuple[str, ...]:
    """Every path whose change can change the verdict (the fingerprint covers them all)."""
    rels = list(g.members)
    if g.link_to and "/" not in g.link_to:
        rels.append(join(g.dir, g.link_to))
    return tuple(rels)


def check_group(tree: _Tree, root: Path, g: Group, fmt: str,
                cache: VerdictCache | None) -> tuple[Verdict, int, float, bool]:
    """(verdict, bytes, newest mtime, cached) for one group."""
    deps = _depends_on(g)
    fp, _, newest, _ = fingerprint(tree.root_fd, deps)
    total = fingerprint(tree.root_fd, g.members)[1]
    # What a verdict depends on outside its own files stays out of the fingerprint: the dir's
    # mtime, or TF's state file rewritten at every save, would invalidate every verdict of
    # the dir at every save (a full re-read of every checkpoint). A Paddle group's need for a
    # marker goes into the key; TF's listing is applied after the cache (tf.with_listing).
    extra = str(paddle.marker_required(g.dir, tree.listing(g.dir))) if g.format == "paddle" else ""
    key = f"{_CACHE_VERSION}|{fmt}|{root}|{g.name}|{extra}|{fp}"
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            try:
                return Verdict.from_json(hit), total, newest, True
            except (ValueError, TypeError):
                pass
    try:
        verdict = _check(tree, g)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        return Verdict(g.format, False, f"unreadable: {e.strerror or e}"), total, newest, False
    if cache is not None and fingerprint(tree.root_fd, deps)[0] == fp:
        cache.put(key, verdict.to_json())
    return verdict, total, newest, False


def _resolve_aliases(groups: list[Group], verdicts: dict[str, Verdict]) -> dict[str, str]:
    """alias name -> the numbered entry with the same step (same format; same dir first)."""
    out: dict[str, str] = {}
    numbered = [g for g in groups if g.alias is None and verdicts[g.name].valid
                and verdicts[g.name].step is not None]
    for g in groups:
        v = verdicts[g.name]
        if g.alias is None or not v.valid:
            continue
        if g.link_to:
            out[g.name] = join(g.dir, g.link_to)
            continue
        if v.step is None:
            continue
        same = [n for n in numbered if n.format == g.format and verdicts[n.name].step == v.step]
        same.sort(key=lambda n: (n.dir != g.dir, not n.name.endswith(keras.WEIGHTS), n.name))
        if same:
            out[g.name] = same[0].name
    return out


def scan(root: Path, fmt: str, cache: VerdictCache | None,
         info_cls: Callable[..., CheckpointInfo], root_fd: int | None = None) -> tuple[list[CheckpointInfo], set[str]]:
    """Framework entries of the checkpoint dir `root` and the top-level names they claim.
    With `root_fd` (the job's held dir fd) everything is read below that fd; `root` only
    names the entries."""
    if fmt not in ("auto",) + NAMES:
        return [], set()
    try:
        root_fd = os.dup(root_fd) if root_fd is not None else os.open(root, _NOFOLLOW_DIR)
    except OSError:
        return [], set()  # the index reports a missing or symlinked dir itself
    try:
        tree = _Tree(root_fd)
        groups = recognise(tree, fmt)
        checked: dict[str, tuple[Verdict, int, float, bool]] = {}
        for g in groups:
            try:
                checked[g.name] = check_group(tree, root, g, fmt, cache)
            except FileNotFoundError:
                continue  # deleted between listing and checking
        for g in groups:
            if g.format == "tf":
                tree.tf_listed(g.dir)   # read while the dir fd is open
    finally:
        os.close(root_fd)
    groups = [g for g in groups if g.name in checked]
    verdicts = {n: c[0] for n, c in checked.items()}
    for g in groups:
        if g.format == "tf":
            verdicts[g.name] = tf.with_listing(verdicts[g.name], g, tree.tf_listed(g.dir))
    for d in {g.dir for g in groups if g.format == "paddle"}:
        verdicts.update(paddle.harmonise({g.name: verdicts[g.name] for g in groups
                                          if g.format == "paddle" and g.dir == d}))
    aliases = _resolve_aliases(groups, verdicts)
    infos = []
    claimed: set[str] = set()
    # Rotation keeps entries whose `alias` flag is set, where CheckpointInfo has one.
    fields = getattr(info_cls, "__dataclass_fields__", {})
    for g in groups:
        _, total, newest, cached = checked[g.name]
        v = verdicts[g.name]
        claimed.update(m.split("/", 1)[0] for m in g.members)
        if g.format == "tf" and not g.dir:
            claimed.add(tf.STATE_FILE)      # TF's commit marker is part of its checkpoints
        resume = g.resume
        if g.link_to and v.valid:
            resume = join(g.dir, g.link_to)  # the file itself: the framework never sees the link
        infos.append(info_cls(
            path=root / g.name, resume=root / resume, name=g.name, format=g.format,
            step=v.step, bytes=total, valid=v.valid, invalid_reason=v.invalid_reason,
            metrics=dict(v.metrics), mtime=newest, epoch=v.epoch, cached=cached,
            members=tuple(g.members), alias_kind=g.alias, alias_of=aliases.get(g.name),
            **({"alias": True} if g.alias and "alias" in fields else {}),
        ))
    return infos, claimed

