"""A bare safetensors file (`model-500.safetensors`, `step_12.safetensors`): valid when the
header and the data agree (readers/safetensors.py). Found wherever a group format looks;
under `auto` only numbered names are taken (an export like `model.safetensors` or a shard
`model-00001-of-00002.safetensors` is the user's, never rotated)."""

from __future__ import annotations

import re

from .common import Invalid, Verdict
from .group import FILE, Group, Listing, Looking, Opened, join
from .readers.safetensors import check_safetensors_fd

NAME = "safetensors"
KIND = "group"
SUFFIX = ".safetensors"
STEM_SUFFIXES = (SUFFIX,)
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def recognise(where: Looking) -> list[Group]:
    return [Group(join(where.dir, n), NAME, (join(where.dir, n),), resume=join(where.dir, n))
            for n, k in sorted(where.listing.items())
            if k == FILE and n.endswith(SUFFIX) and not n.startswith(".")]


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    base = g.name.rsplit("/", 1)[-1]
    m = _NUMBER.search(base[: -len(SUFFIX)])
    step = int(m.group(1)) if m else None
    try:
        with Opened(root_fd, g.name) as (fd, st):
            check_safetensors_fd(fd, st.st_size)
    except Invalid as e:
        return Verdict(NAME, False, str(e), step)
    return Verdict(NAME, True, None, step)
