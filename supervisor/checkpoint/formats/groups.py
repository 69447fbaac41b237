"""The scan of group formats: checkpoints that are several files, or a file in a folder of
its own (Paddle prefix groups, TF index + shards, Keras, Lightning, safetensors).

Each group format (a module in the FORMATS table with KIND = "group") finds its entries
where it puts them — the checkpoint dir, its direct subdirs, dirs a format adds (Lightning's
`lightning_logs/version_N/checkpoints/`) — and checks each as one unit through the verdict
cache. This module knows no format by name: whatever differs between formats is a hook of
the format's module (see formats/__init__.py). It names aliases (`latest`,
`best_accuracy`, `last.ckpt`, the Keras backup) and the numbered checkpoint whose step they
share, and returns index.CheckpointInfo records plus the top-level names it claimed (the
index's own scan skips those).

Nothing here imports a framework or unpickles: pickles are walked as opcode streams, TF
bundles as SSTables, HDF5 by its superblock.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from struct import error as struct_error
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import budget
from ..jobfile import open_entry_dir
from . import FORMATS, GROUP, hook
from .common import Invalid, Verdict, VerdictCache
from .group import DIR, Group, Listing, Looking, fingerprint, list_dir, numbered, open_dir_under

if TYPE_CHECKING:
    from ..index import CheckpointInfo

_CACHE_VERSION = "fw3"
log = logging.getLogger("trainsup.checkpoint")


class Tree:
    """Listings of the dirs a scan looks at, each read once, through O_NOFOLLOW fds, and
    whatever a format reads once per scan (TF's state file), kept by key."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.cache: dict[str, Listing] = {}
        self.memo: dict[tuple[str, str], Any] = {}

    def listing(self, rel: str) -> Listing:
        if rel not in self.cache:
            try:
                fd = open_dir_under(self.root_fd, rel)
            except Invalid:
                self.cache[rel] = {}
                return self.cache[rel]
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                    self.cache[rel] = {}
                    return self.cache[rel]
                raise
            try:
                self.cache[rel] = list_dir(fd)
            finally:
                os.close(fd)
        return self.cache[rel]

    def once(self, key: tuple[str, str], read: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = read()
        return self.memo[key]

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


def _formats(fmt: str) -> list[ModuleType]:
    return [FORMATS[n] for n in GROUP if fmt in ("auto", n)]


def _search_dirs(tree: Tree, fmt: str) -> list[tuple[str, bool]]:
    """(dir relative to the root, is a dir a format added, such as Lightning's checkpoints
    dirs), root first. A subdir an entry format claims (`step-N/`, `checkpoint-N/`) or a
    format calls an entry of its own (TF's `ckpt-3_temp/`) is not a folder of entries."""
    root = tree.listing("")
    out = [("", False)]
    for name, kind in sorted(root.items()):
        if kind != DIR or name.startswith("."):
            continue
        if any(m.claims(name, True) for m in FORMATS.values() if m.KIND == "entry"):
            continue
        if any(hook(m, "skips_dir", lambda name: False)(name) for m in FORMATS.values() if m.KIND == "group"):
            continue
        out.append((name, False))
    for m in _formats(fmt):
        out += [(d, True) for d in hook(m, "extra_dirs", lambda listing_of, root: ())(tree.listing, root)]
    return out


def _stem(g: Group) -> str:
    base = g.name.rsplit("/", 1)[-1]
    for suffix in hook(FORMATS[g.format], "STEM_SUFFIXES", ()):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _claimed_by_auto(tree: Tree, g: Group) -> bool:
    """`auto` claims numbered saves and the frameworks' own aliases, nothing else: a file
    it claims may be rotated away, and an export like `final.keras` is not a checkpoint."""
    m = FORMATS[g.format]
    if hook(m, "AUTO_CLAIMS_ALL", False) or g.alias is not None or numbered(_stem(g)):
        return True
    return bool(hook(m, "auto_claims", lambda tree, g: False)(tree, g))


def recognise(tree: Tree, fmt: str) -> list[Group]:
    groups: list[Group] = []
    for d, added in _search_dirs(tree, fmt):
        listing = tree.listing(d)
        for m in _formats(fmt):
            groups += m.recognise(Looking(d, listing, explicit=fmt == m.NAME, lightning_dir=added,
                                          readlink=tree.readlink, listing_of=tree.listing))
    if fmt == "auto":
        groups = [g for g in groups if _claimed_by_auto(tree, g)]
    return groups


def _depends_on(g: Group) -> tuple[str, ...]:
    """Every path whose change can change the verdict (the fingerprint covers them all)."""
    rels = list(g.members)
    if g.link_to and "/" not in g.link_to:
        rels.append(f"{g.dir}/{g.link_to}" if g.dir else g.link_to)
    return tuple(rels)


def check_group(tree: Tree, root: Path, g: Group, fmt: str,
                cache: VerdictCache | None) -> tuple[Verdict, int, float, bool]:
    """(verdict, bytes, newest mtime, cached) for one group."""
    m = FORMATS[g.format]
    deps = _depends_on(g)
    fp, _, newest, _ = fingerprint(tree.root_fd, deps)
    total = fingerprint(tree.root_fd, g.members)[1]
    # What a verdict depends on outside its own files stays out of the fingerprint: the dir's
    # mtime, or TF's state file rewritten at every save, would invalidate every verdict of
    # the dir at every save (a full re-read of every checkpoint). What a format's verdict
    # does depend on in the dir goes into the key (cache_key); the rest is applied after
    # the cache (finish).
    listing = tree.listing(g.dir)
    extra = hook(m, "cache_key", lambda g, listing: "")(g, listing)
    key = f"{_CACHE_VERSION}|{fmt}|{root}|{g.name}|{extra}|{fp}"
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            try:
                return Verdict.from_json(hit), total, newest, True
            except (ValueError, TypeError):
                pass
    try:
        verdict = checked(g.format, g.name, lambda: m.check(tree.root_fd, g, listing))
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        return Verdict(g.format, False, f"unreadable: {e.strerror or e}"), total, newest, False
    if verdict is None:
        return Verdict(g.format, False, "unreadable: internal error (logged)"), total, newest, False
    if cache is not None and fingerprint(tree.root_fd, deps)[0] == fp:
        cache.put(key, verdict.to_json())
    return verdict, total, newest, False


def checked(fmt: str, name: str, check: Callable[[], Verdict], step: int | None = None) -> Verdict | None:
    """A format's check under its own read budget (budget.py), whatever it trips on kept
    to that entry's verdict. None: an internal error (logged; not cached, never deleted
    on its account). OSError and Cancelled pass through."""
    try:
        with budget.verdict_budget():
            return check()
    except budget.OverBudget as e:
        return Verdict(fmt, False, str(e), step)
    except Invalid as e:
        return Verdict(fmt, False, str(e), step)
    except (OSError, budget.Cancelled):
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, struct_error) as e:
        # whatever a hostile entry makes a checker trip on is that entry's verdict
        return Verdict(fmt, False, f"malformed: {type(e).__name__}: {str(e)[:300]}", step)
    except Exception:
        log.exception("checking %s (%s)", name, fmt)
        return None


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
            out[g.name] = f"{g.dir}/{g.link_to}" if g.dir else g.link_to
            continue
        if v.step is None:
            continue
        rank = hook(FORMATS[g.format], "alias_rank", lambda name: 0)
        same = [n for n in numbered if n.format == g.format and verdicts[n.name].step == v.step]
        same.sort(key=lambda n: (n.dir != g.dir, rank(n.name), n.name))
        if same:
            out[g.name] = same[0].name
    return out


def scan(root: Path, fmt: str, cache: VerdictCache | None,
         info_cls: Callable[..., CheckpointInfo], root_fd: int | None = None) -> tuple[list[CheckpointInfo], set[str]]:
    """Group-format entries of the checkpoint dir `root` and the top-level names they
    claim. With `root_fd` (the job's held dir fd) everything is read below that fd; `root`
    only names the entries."""
    if fmt != "auto" and fmt not in GROUP:
        return [], set()
    try:
        root_fd = os.dup(root_fd) if root_fd is not None else open_entry_dir(str(root))
    except OSError:
        return [], set()  # the index reports a missing or symlinked dir itself
    try:
        tree = Tree(root_fd)
        groups = recognise(tree, fmt)
        checked: dict[str, tuple[Verdict, int, float, bool]] = {}
        for g in groups:
            try:
                checked[g.name] = check_group(tree, root, g, fmt, cache)
            except FileNotFoundError:
                continue  # deleted between listing and checking
        groups = [g for g in groups if g.name in checked]
        verdicts = {n: c[0] for n, c in checked.items()}
        # Verdicts of one format that depend on each other or on the dir (TF's state file
        # lists what is committed; Paddle groups without a marker take their step from
        # their neighbours'), read while the dir fd is open.
        for name in GROUP:
            mine = [g for g in groups if g.format == name]
            if mine:
                hook(FORMATS[name], "finish", lambda tree, groups, verdicts: None)(tree, mine, verdicts)
    finally:
        os.close(root_fd)
    aliases = _resolve_aliases(groups, verdicts)
    infos = []
    claimed: set[str] = set()
    # Rotation keeps entries whose `alias` flag is set, where CheckpointInfo has one.
    fields = getattr(info_cls, "__dataclass_fields__", {})
    for g in groups:
        _, total, newest, cached = checked[g.name]
        v = verdicts[g.name]
        claimed.update(m.split("/", 1)[0] for m in g.members)
        claimed.update(hook(FORMATS[g.format], "also_claims", lambda g: ())(g))
        resume = g.resume
        if g.link_to and v.valid:
            # the file itself: the framework never sees the link
            resume = f"{g.dir}/{g.link_to}" if g.dir else g.link_to
        infos.append(info_cls(
            path=root / g.name, resume=root / resume, name=g.name, format=g.format,
            step=v.step, bytes=total, valid=v.valid, invalid_reason=v.invalid_reason,
            metrics=dict(v.metrics), mtime=newest, epoch=v.epoch, cached=cached,
            members=tuple(g.members), alias_kind=g.alias, alias_of=aliases.get(g.name),
            **({"alias": True} if g.alias and "alias" in fields else {}),
        ))
    return infos, claimed
