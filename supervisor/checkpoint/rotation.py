"""Which checkpoints to delete (SPEC section 6). Pure policy: facts in, a plan out, no I/O.

Normal pass: keep the union of the newest `keep_last` valid checkpoints, the `keep_best`
best by `metric`, those whose step is a multiple of `keep_every`, and pinned ones; delete
the rest. Deletion order (the order of `RotationPlan.delete`): invalid checkpoints older
than the newest valid one and stale in-progress tmp dirs first, then rotated valid ones,
each group oldest first.

Quota pass, while the job is over quota: relax keep_every, then keep_best, then keep_last
down to 1, each oldest first. Never touched: the newest valid checkpoint, the one the
running attempt resumed from, pinned ones, in-progress tmp dirs younger than tmp_grace,
and invalid entries newer than the newest valid one that changed within tmp_grace (torch
and HF write in place: a save under way looks exactly like a broken file).

Kept reasons (strongest first): newest (the newest valid), resumed-from, in-progress,
pinned, last (inside keep_last), best, every.

`plan_disk_quota` applies the daemon-wide `disk_quota` on top of per-job plans: it takes
from every job's remaining ladder together, stage by stage (every, then best, then last),
globally oldest first, so no job loses a keep_last checkpoint while another job still has
a relaxable keep_every one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from ..spec import CheckpointSpec
from .index import CheckpointInfo, metric_value

# Relaxation stages for the quota pass; a checkpoint's stage is that of its strongest
# relaxable reason.
STAGE_EVERY, STAGE_BEST, STAGE_LAST = 1, 2, 3
_STAGE_OF = {"every": STAGE_EVERY, "best": STAGE_BEST, "last": STAGE_LAST}
_RELAXED = {STAGE_EVERY: "keep_every", STAGE_BEST: "keep_best", STAGE_LAST: "keep_last"}
_UNSET = object()

Pin = Union[int, str, Path]


@dataclass(frozen=True)
class RotationPlan:
    delete: list[CheckpointInfo]                      # in the order to delete them
    kept: dict[Path, str]                             # path -> why kept
    reasons: dict[Path, str]                          # path -> why deleted
    over_quota: bool                                  # quota still not met after the plan
    total_bytes: int                                  # before the plan
    kept_bytes: int                                   # after the plan
    quota: Optional[int] = None
    # what could still go under more pressure (daemon-wide quota), in the order it would go
    ladder: tuple[tuple[int, CheckpointInfo], ...] = field(default=(), repr=False)


def plan_rotation(
    infos: Sequence[CheckpointInfo],
    spec: CheckpointSpec,
    *,
    pinned: Iterable[Pin] = frozenset(),
    resumed_from: Optional[Union[str, Path]] = None,
    now: Optional[float] = None,
    tmp_grace: float = 180.0,
    quota: object = _UNSET,
) -> RotationPlan:
    """Plan one job's rotation. `infos` oldest first (index.scan's order).

    pinned: steps (int) or paths/names of pinned checkpoints. now: wall-clock seconds,
    compared with mtimes. tmp_grace: emergency_save.grace plus a minute. quota: bytes,
    None for none; defaults to spec.quota.
    """
    now = time.time() if now is None else now
    quota = spec.quota if quota is _UNSET else quota
    pin_steps = {p for p in pinned if isinstance(p, int)}
    pin_names = {Path(p).name for p in pinned if not isinstance(p, int)}
    resumed = Path(resumed_from) if resumed_from else None

    kept: dict[Path, str] = {}
    reasons: dict[Path, str] = {}
    first: list[CheckpointInfo] = []
    rest: list[CheckpointInfo] = []

    def keep(i: CheckpointInfo, why: str) -> None:
        kept.setdefault(i.path, why)

    valid = [i for i in infos if i.valid and not i.in_progress]
    newest = valid[-1] if valid else None
    newest_pos = -1
    for pos, i in enumerate(infos):
        if i is newest:
            newest_pos = pos

    # Absolute protections first: setdefault keeps the strongest reason.
    if newest is not None:
        keep(newest, "newest")
    for pos, i in enumerate(infos):
        if resumed is not None and i.path == resumed:
            keep(i, "resumed-from")
        if i.in_progress and now - i.mtime < tmp_grace:
            keep(i, "in-progress")
        if not i.in_progress and (i.name in pin_names or (i.step is not None and i.step in pin_steps)):
            keep(i, "pinned")
    for i in infos:
        if getattr(i, "alias_kind", None):
            keep(i, "alias")    # latest / last.ckpt / backup: the framework rewrites it in place
    if spec.keep_last > 0:
        # aliases duplicate a numbered save: they are not a state of their own for keep_last
        for i in [v for v in valid if not getattr(v, "alias_kind", None)][-spec.keep_last:]:
            keep(i, "last")
    if spec.keep_best > 0 and spec.metric:
        sign = 1.0 if spec.mode == "min" else -1.0
        scored = [(sign * v, -pos, i) for pos, i in enumerate(valid)
                  if (v := metric_value(i, spec.metric)) is not None]
        scored.sort(key=lambda t: (t[0], t[1]))
        for _, _, i in scored[: spec.keep_best]:
            keep(i, "best")
    if spec.keep_every > 0:
        for i in valid:
            if i.step is not None and i.step % spec.keep_every == 0:
                keep(i, "every")

    for pos, i in enumerate(infos):
        if i.path in kept:
            continue
        if i.in_progress:
            first.append(i)
            reasons[i.path] = f"stale in-progress save (unchanged for over {tmp_grace:g}s)"
        elif not i.valid:
            if pos > newest_pos and now - i.mtime < tmp_grace:
                keep(i, "in-progress")  # may be a save still being written in place
            elif pos > newest_pos:
                first.append(i)
                reasons[i.path] = f"invalid ({i.invalid_reason}), unchanged for over {tmp_grace:g}s"
            else:
                first.append(i)
                reasons[i.path] = f"invalid ({i.invalid_reason}), older than the newest valid"
        else:
            rest.append(i)
            reasons[i.path] = "rotated: not among keep_last/keep_best/keep_every/pinned"

    delete = first + rest
    total = sum(i.bytes for i in infos)
    remaining = total - sum(i.bytes for i in delete)

    # Relaxable protections, in the order the quota pass gives them up.
    ladder = sorted(
        ((_STAGE_OF[kept[i.path]], pos, i) for pos, i in enumerate(infos)
         if kept.get(i.path) in _STAGE_OF),
        key=lambda t: (t[0], t[1]),
    )
    taken = 0
    if quota is not None:
        for stage, _, i in ladder:
            if remaining <= quota:
                break
            del kept[i.path]
            delete.append(i)
            reasons[i.path] = f"over quota ({quota} bytes): {_RELAXED[stage]} relaxed"
            remaining -= i.bytes
            taken += 1
    return RotationPlan(
        delete=delete, kept=kept, reasons=reasons,
        over_quota=quota is not None and remaining > quota,
        total_bytes=total, kept_bytes=remaining, quota=quota,
        ladder=tuple((stage, i) for stage, _, i in ladder[taken:]),
    )


@dataclass(frozen=True)
class DiskQuotaPlan:
    delete: dict[str, list[CheckpointInfo]]       # job -> extra deletions, in order
    reasons: dict[Path, str]
    over_quota: bool
    kept_bytes: int


def plan_disk_quota(plans: Mapping[str, RotationPlan], disk_quota: Optional[int]) -> DiskQuotaPlan:
    """Extra deletions so that all jobs together fit `disk_quota`, after their own plans.

    Takes from every job's ladder stage by stage (keep_every, keep_best, keep_last), the
    globally oldest (by mtime) first within a stage. Protected checkpoints are never taken.
    """
    total = sum(p.kept_bytes for p in plans.values())
    out: dict[str, list[CheckpointInfo]] = {job: [] for job in plans}
    reasons: dict[Path, str] = {}
    if disk_quota is None or total <= disk_quota:
        return DiskQuotaPlan(out, reasons, False, total)
    candidates = sorted(
        ((stage, i.mtime, job, n, i) for job, p in plans.items() for n, (stage, i) in enumerate(p.ladder)),
        key=lambda t: (t[0], t[1], t[2], t[3]),
    )
    for stage, _, job, _, i in candidates:
        if total <= disk_quota:
            break
        out[job].append(i)
        reasons[i.path] = f"over disk_quota ({disk_quota} bytes, all jobs): {_RELAXED[stage]} relaxed"
        total -= i.bytes
    return DiskQuotaPlan(out, reasons, total > disk_quota, total)
