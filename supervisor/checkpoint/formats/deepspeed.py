"""DeepSpeed `engine.save_checkpoint(save_dir)`: a folder per save, `<save_dir>/<tag>/` (tag
`global_stepN` unless the script names one), and a `latest` file in save_dir naming the
newest tag.

How a save commits: every rank writes its files into the tag folder (rank 0 of each
model-parallel group `mp_rank_MM_model_states.pt`; with ZeRO every data-parallel rank its
`zero_pp_rank_R_mp_rank_MM_optim_states.pt`, and under ZeRO-3 its own model states), all
ranks meet at a barrier, then rank 0 writes the tag into `latest`. So `latest` is the
commit marker: a folder newer than the tag it names was not finished (a rank was killed
before the barrier), and `load_checkpoint(save_dir)` reads `latest` to choose what to load.

What is checked, nothing unpickled: every `.pt` is a complete torch.save zip (central
directory, CRCs); at least one model-states file; under ZeRO a file for every
data-parallel rank 0..dp_world_size-1 of every model-parallel rank present
(`dp_world_size` and `global_steps` read from the model states' pickle opcodes); and,
when there is a `latest`, the folder is not newer than the save it names.

Bookkeeping: the save `latest` names is kept by rotation (load_checkpoint without a tag
loads it), so `latest` always names a complete save on disk.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .common import Invalid, Verdict
from .group import DIR, FILE, Group, Listing, Looking, Opened, join, list_dir, open_dir_under, read_small
from .readers.zip import check_torch_fd

NAME = "deepspeed"
KIND = "group"
COMMIT_MARKER = "latest"
AUTO_CLAIMS_ALL = True          # a folder is DeepSpeed's only by its mp_rank_/zero_pp_rank_ files
_MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_STEP_RE = re.compile(r"(\d+)$")
_MAX_DATA_PKL = 64 << 20
_MAX_LATEST = 4096


def is_deepspeed_listing(listing: Listing) -> bool:
    """Model or optimizer states of some rank (a killed save may hold only another rank's)."""
    return any(k == FILE and (_MODEL_RE.match(n) or _OPTIM_RE.match(n)) for n, k in listing.items())


def recognise(where: Looking) -> list[Group]:
    groups = []
    marker = (join(where.dir, COMMIT_MARKER),) if where.listing.get(COMMIT_MARKER) == FILE else ()
    for name, kind in sorted(where.listing.items()):
        if kind != DIR or name.startswith("."):
            continue
        rel = join(where.dir, name)
        if is_deepspeed_listing(where.listing_of(rel)):
            groups.append(Group(rel, NAME, (rel,), resume=rel, markers=marker))
    return groups


def step_of(base: str) -> int | None:
    m = _STEP_RE.search(base)
    return int(m.group(1)) if m else None


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    """The bytes verdict (the `latest` rule is applied in finish: it changes at every save)."""
    base = g.name.rsplit("/", 1)[-1]
    step = step_of(base)
    try:
        fd = open_dir_under(root_fd, g.name)
        try:
            names = list_dir(fd)
        finally:
            os.close(fd)
        found = _check_files(root_fd, g.name, names)
    except Invalid as e:
        return Verdict(NAME, False, str(e), step)
    except OSError as e:
        return Verdict(NAME, False, f"unreadable: {e.strerror or e}", step)
    return Verdict(NAME, True, None, found if found is not None else step)


def _check_files(root_fd: int, d: str, names: Listing) -> int | None:
    models: dict[str, tuple[int | None, int]] = {}
    optims: dict[int, set[int]] = {}
    header: dict[str, int] = {}
    for n, k in sorted(names.items()):
        if n.endswith(".pt") and k != FILE:
            raise Invalid(f"{n}: not a regular file")
        if k != FILE or not n.endswith(".pt"):
            continue
        with Opened(root_fd, f"{d}/{n}") as (fd, st):
            try:
                check_torch_fd(fd, st.st_size)
            except Invalid as e:
                raise Invalid(f"{n}: {e}") from None
            if (m := _MODEL_RE.match(n)) is not None:
                models[n] = (int(m.group(1)) if m.group(1) else None, int(m.group(2)))
                if len(models) == 1:
                    header = _top_ints(fd, ("dp_world_size", "global_steps"))
        if (m := _OPTIM_RE.match(n)) is not None:
            optims.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not models:
        raise Invalid("no mp_rank_*_model_states.pt (the model was never written)")
    if optims:
        world = header.get("dp_world_size")
        for mp, ranks in sorted(optims.items()):
            want = set(range(world if isinstance(world, int) and world > 0 else max(ranks) + 1))
            missing = sorted(want - ranks)
            if missing:
                raise Invalid(f"missing the optimizer states of data-parallel rank(s) {missing} "
                              f"(mp_rank_{mp:02d}; dp_world_size {world}): a rank never wrote its part")
    steps = header.get("global_steps")
    return steps if isinstance(steps, int) else None


def _top_ints(fd: int, keys: tuple[str, ...]) -> dict[str, int]:
    """Ints that follow the given key strings in data.pkl's opcode stream (never unpickled)."""
    out: dict[str, int] = {}
    try:
        with zipfile.ZipFile(os.fdopen(fd, "rb", closefd=False)) as zf:
            pkl = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if not pkl or pkl[0].file_size > _MAX_DATA_PKL:
                return out
            data = zf.read(pkl[0])
        import pickletools
        want: str | None = None
        for op, arg, _ in pickletools.genops(data):
            if want is not None:
                if op.name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    continue
                if op.name in ("BININT", "BININT1", "BININT2", "LONG1") and isinstance(arg, int):
                    out.setdefault(want, arg)
                want = None
            if isinstance(arg, str) and arg in keys:
                want = arg
    except (ValueError, zipfile.BadZipFile, OSError):
        return out
    return out


# ---------------------------------------------------------------- the `latest` file

def latest_tag(root_fd: int, d: str, listing: Listing) -> str | None:
    """The tag `latest` names (None: no `latest`, or one being rewritten: empty)."""
    if listing.get(COMMIT_MARKER) != FILE:
        return None
    try:
        tag = read_small(root_fd, join(d, COMMIT_MARKER), "deepspeed_latest").decode("utf-8", "replace").strip()
    except Invalid:
        return None
    return tag or None


def finish(tree: Any, groups: list[Group], verdicts: dict[str, Verdict]) -> None:
    """A folder newer than the save `latest` names never reached the barrier after which
    DeepSpeed writes `latest`: not committed."""
    for g in groups:
        tag = tree.once((NAME, g.dir), lambda g=g: latest_tag(tree.root_fd, g.dir, tree.listing(g.dir)))
        v = verdicts[g.name]
        base = g.name.rsplit("/", 1)[-1]
        if tag is None or tag == base:
            continue
        named = verdicts.get(join(g.dir, tag))
        at = named.step if named is not None and named.step is not None else step_of(tag)
        if at is not None and v.step is not None and v.step > at:
            why = f"newer than '{tag}' that {COMMIT_MARKER} names (the save never finished on every rank)"
            verdicts[g.name] = replace(v, valid=False,
                                       invalid_reason=f"{why}; {v.invalid_reason}" if v.invalid_reason else why)


def protected_steps(root_fd: int, infos: Sequence[Any]) -> set[int]:
    """The step of the save `latest` names: load_checkpoint(save_dir) loads it (read
    through the job's held dir: a FIFO named `latest` is a refusal, never a wait)."""
    out: set[int] = set()
    for d in {i.name.rpartition("/")[0] for i in infos if i.format == NAME}:
        try:
            tag = read_small(root_fd, join(d, COMMIT_MARKER), "deepspeed_latest").decode("utf-8", "replace").strip()
        except (Invalid, OSError):
            continue
        for i in infos:
            if i.format == NAME and i.name == join(d, tag) and i.step is not None:
                out.add(i.step)
    return out
