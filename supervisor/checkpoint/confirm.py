"""Which checkpoint confirms a save request: one committed after the request, never one
merely *found* after it.

A request records the newest valid step and the wall time. A checkpoint confirms it when it
is valid, numbered past that step (or, unnumbered like a rewritten `latest.pth`, not one of
the valid entries known then), and its newest file was written after the request. Found
later is not enough: an old checkpoint-92 whose completion the index saw late, or one copied
in with its old mtimes, once confirmed a preempt at step 661 and SIGTERM went out while the
requested save was still being written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# File mtimes come from the kernel's coarse clock, which lags time.time() by up to a tick
# (1-10 ms): a file written right after the request may carry a slightly earlier mtime.
_CLOCK_SLACK_S = 0.02


def entry_key(info: Any) -> tuple:
    return (str(info.path), info.step, info.mtime, info.bytes)


@dataclass(frozen=True)
class SaveRequest:
    wall: float                  # time.time() when the save was asked for
    step: int | None             # the newest valid step then
    known: frozenset             # entry_key of every valid entry then


def save_request(infos: Sequence[Any], wall: float) -> SaveRequest:
    valid = [i for i in infos if i.valid and not i.in_progress]
    steps = [i.step for i in valid if i.step is not None]
    return SaveRequest(wall, max(steps) if steps else None, frozenset(entry_key(i) for i in valid))


def confirms(info: Any, req: SaveRequest) -> bool:
    if not info.valid or info.in_progress:
        return False
    if info.mtime < req.wall - _CLOCK_SLACK_S:
        return False                     # committed before the request: found, not saved
    if info.step is not None and req.step is not None:
        return info.step > req.step
    return entry_key(info) not in req.known


def confirmation(infos: Sequence[Any], req: SaveRequest) -> Any | None:
    """The newest checkpoint that confirms `req`, if any (a numbered one over its alias)."""
    found = [i for i in infos if confirms(i, req)]
    if not found:
        return None
    return max(found, key=lambda i: (i.step if i.step is not None else -1, not _is_alias(i), i.mtime))


def _is_alias(info: Any) -> bool:
    return bool(getattr(info, "alias_kind", None) or getattr(info, "alias", None))
