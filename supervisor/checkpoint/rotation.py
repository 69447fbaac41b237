"""Which checkpoints to delete (SPEC section 6). Pure policy: facts in, a plan out, no I/O.

The deletion design, safe by construction. An entry may be deleted only if ALL
of these hold, each proven by a fact the plan is given, never by a guess:

  owned      it is an entry of this job's own checkpoint dir, resolved once and held as
             an fd (dirhandle.py; claims.py refused `/`, homes, the state/jobs dirs and
             dirs shared with or nested in another job's) — proof: index.scan lists only
             that fd's entries, trash.py deletes only beneath it;
  managed    the job's format names it a checkpoint (naming.py: numbered names, aliases,
             `checkpoint.pattern`) — proof: info.managed; everything else is `unmanaged`;
  written by the job
             it was not there before the job's first launch (inventory.py), unless
             `checkpoint.pattern` claims it — proof: `preexisting` (names with inode);
  not live   no writer can still be writing it: not a tmp dir whose writer pid is alive
             with a matching start time, no file changed within the quiet window by the
             daemon's monotonic observation, not open by a process of the job — proof:
             `live` (liveness.py); wall-clock time is never consulted here;
  known      its verdict is valid or invalid, never "unknown" (unreadable: EACCES/EIO/
             EMFILE; unprovable: legacy pickles) — proof: info.unknown;
  not the last good state
             at least one valid checkpoint exists (else nothing at all is deleted); it is
             not the newest valid by step order, nor the newest valid by mtime, nor the
             newest valid by step number, nor an alias (`last.ckpt`, `latest.pth`: the
             framework's own "newest", whatever the clock did), nor the checkpoint the
             running attempt resumed from, nor pinned;
  deletable  no earlier attempt failed and is still backing off, no mount point inside
             (`undeletable`, from deleter.py).

Normal pass: keep the union of the newest `keep_last` valid checkpoints, the `keep_best`
best by `metric`, those whose step is a multiple of `keep_every`, and pinned ones; delete
the rest. Deletion order: invalid and stale in-progress entries first, then rotated valid
ones, each group oldest first. Quota pass, while over quota: relax keep_every, then
keep_best, then keep_last down to 1, each oldest first. Protections are never relaxed;
what cannot be met is reported `over_quota`.

`plan_disk_quota` applies the daemon-wide `disk_quota` on top of per-job plans: it takes
from every job's remaining ladder together, stage by stage (every, then best, then last),
globally oldest first, so no job loses a keep_last checkpoint while another job still has
a relaxable keep_every one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..spec import CheckpointSpec
from .index import CheckpointInfo, metric_value

# Relaxation stages for the quota pass; a checkpoint's stage is that of its strongest
# relaxable reason.
STAGE_EVERY, STAGE_BEST, STAGE_FRAMEWORK, STAGE_LAST, STAGE_UNMIRRORED = 1, 2, 3, 4, 5
_STAGE_OF = {"every": STAGE_EVERY, "best": STAGE_BEST, "framework": STAGE_FRAMEWORK, "last": STAGE_LAST,
             "not-uploaded": STAGE_UNMIRRORED}
_RELAXED = {STAGE_EVERY: "keep_every", STAGE_BEST: "keep_best",
            STAGE_FRAMEWORK: "the framework's own best k", STAGE_LAST: "keep_last",
            STAGE_UNMIRRORED: "the wait for its upload"}
_UNSET = object()
# Never deleted, not even to meet a quota.
PROTECTED = frozenset({"newest", "resumed-from", "in-progress", "pinned", "unmanaged", "unknown",
                       "preexisting", "alias", "undeletable", "nothing-valid"})

Pin = int | str | Path


@dataclass(frozen=True)
class RotationPlan:
    delete: list[CheckpointInfo]                      # in the order to delete them
    kept: dict[Path, str]                             # path -> why kept
    reasons: dict[Path, str]                          # path -> why deleted
    over_quota: bool                                  # quota still not met after the plan
    total_bytes: int                                  # before the plan
    kept_bytes: int                                   # after the plan
    quota: int | None = None
    # what could still go under more pressure (daemon-wide quota), in the order it would go
    ladder: tuple[tuple[int, CheckpointInfo], ...] = field(default=(), repr=False)


def plan_rotation(
    infos: Sequence[CheckpointInfo],
    spec: CheckpointSpec,
    *,
    pinned: Iterable[Pin] = frozenset(),
    framework_kept: Iterable[Path] = frozenset(),
    resumed_from: str | Path | None = None,
    live: Collection[str] | None = None,
    preexisting: Collection[str] = frozenset(),
    undeletable: Mapping[str, str] | None = None,
    quota: object = _UNSET,
    now: float | None = None,
    tmp_grace: float | None = None,
    unuploaded: Collection[str] = frozenset(),
) -> RotationPlan:
    """Plan one job's rotation. `infos` oldest first (index.scan's order).

    pinned: steps (int), absolute paths (a framework's bookkeeping names entries by path:
    formats.protected_steps) or names of pinned checkpoints. framework_kept: absolute
    paths a framework's own retention counts on (Lightning's best k, formats.kept_by_framework):
    kept above keep_last, given up under quota before it. live: names of entries a
    writer may still be writing (liveness.py). preexisting: names there before the job's
    first launch that `pattern` does not claim (inventory.py). undeletable: name -> why
    (a failed deletion backing off, a mount inside). quota: bytes, None for none;
    defaults to spec.quota.

    unuploaded: names of valid checkpoints the mirror still has to upload: the only copy
    is kept ("not-uploaded") while the quota allows, and given up last under quota pressure
    (after keep_last: a checkpoint already in the store is the cheaper loss).

    live=None means "not observed": every in-progress or invalid entry is then treated as
    live (no proof that its writer is gone, so it stays). now/tmp_grace are accepted from
    callers not yet migrated and ignored: wall-clock ages decide nothing here.
    """
    limit: int | None = spec.quota if quota is _UNSET else quota  # type: ignore[assignment]
    if live is None:
        live = {i.name for i in infos if i.in_progress or not i.valid}
    undeletable = undeletable or {}
    pin_steps = {p for p in pinned if isinstance(p, int)}
    pin_paths = {p for p in pinned if isinstance(p, Path) and p.is_absolute()}
    pin_names = {Path(p).name for p in pinned if not isinstance(p, int) and p not in pin_paths}
    resumed = Path(resumed_from) if resumed_from else None

    kept: dict[Path, str] = {}
    reasons: dict[Path, str] = {}
    first: list[CheckpointInfo] = []
    rest: list[CheckpointInfo] = []

    def keep(i: CheckpointInfo, why: str) -> None:
        kept.setdefault(i.path, why)

    valid = [i for i in infos if i.valid and not i.in_progress and i.managed]
    newest = valid[-1] if valid else None
    newest_pos = -1
    for pos, i in enumerate(infos):
        if i is newest:
            newest_pos = pos

    # Absolute protections first: setdefault keeps the strongest reason.
    if newest is not None:
        keep(newest, "newest")
        # the newest by any other ordering too: a clock step makes mtime and step disagree
        # (ties go to the later in step order, which is already protected)
        keep(max(enumerate(valid), key=lambda t: (t[1].mtime, t[0]))[1], "newest")
        numbered = [(pos, i) for pos, i in enumerate(valid) if i.step is not None]
        if numbered:
            keep(max(numbered, key=lambda t: (t[1].step, t[0]))[1], "newest")
    for i in infos:
        if not i.managed:
            keep(i, "unmanaged")
        elif not i.in_progress and i.name in preexisting:
            keep(i, "preexisting")
        elif i.unknown:
            keep(i, "unknown")
        elif i.name in live:
            keep(i, "in-progress")
        elif i.alias:
            keep(i, "alias")
        elif i.name in undeletable:
            keep(i, "undeletable")
        if resumed is not None and i.path == resumed:
            keep(i, "resumed-from")
        if not i.in_progress and (i.name in pin_names or i.path in pin_paths
                                  or (i.step is not None and i.step in pin_steps)):
            keep(i, "pinned")
    if newest is None:
        # Nothing valid: whatever is here may be the only state the job can resume from.
        for i in infos:
            keep(i, "nothing-valid")
    for i in infos:
        if getattr(i, "alias_kind", None):
            keep(i, "alias")    # latest / last.ckpt / backup: the framework rewrites it in place
    for i in valid:
        if i.name in unuploaded:
            keep(i, "not-uploaded")     # before keep_last: the stronger reason under quota
    if spec.keep_last > 0:
        # aliases duplicate a numbered save: they are not a state of their own for keep_last
        for i in [v for v in valid if not getattr(v, "alias_kind", None)][-spec.keep_last:]:
            keep(i, "last")
    fw_kept = {Path(p) for p in framework_kept}
    for i in valid:
        if i.path in fw_kept:
            keep(i, "framework")
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
            reasons[i.path] = "stale in-progress save (writer gone, nothing changed in the quiet window)"
        elif not i.valid:
            first.append(i)
            where = "older" if pos < newest_pos else "newer"
            reasons[i.path] = f"invalid ({i.invalid_reason}), {where} than the newest valid, not being written"
        else:
            rest.append(i)
            reasons[i.path] = "rotated: not among keep_last/keep_best/keep_every/pinned/the framework's best k"

    delete = first + rest
    total = sum(i.bytes for i in infos if i.managed)
    remaining = total - sum(i.bytes for i in delete)

    # Relaxable protections, in the order the quota pass gives them up.
    ladder = sorted(
        ((_STAGE_OF[kept[i.path]], pos, i) for pos, i in enumerate(infos)
         if kept.get(i.path) in _STAGE_OF),
        key=lambda t: (t[0], t[1]),
    )
    taken = 0
    if limit is not None:
        for stage, _, i in ladder:
            if remaining <= limit:
                break
            del kept[i.path]
            delete.append(i)
            reasons[i.path] = f"over quota ({limit} bytes): {_RELAXED[stage]} relaxed"
            remaining -= i.bytes
            taken += 1
    return RotationPlan(
        delete=delete, kept=kept, reasons=reasons,
        over_quota=limit is not None and remaining > limit,
        total_bytes=total, kept_bytes=remaining, quota=limit,
        ladder=tuple((stage, i) for stage, _, i in ladder[taken:]),
    )


@dataclass(frozen=True)
class DiskQuotaPlan:
    delete: dict[str, list[CheckpointInfo]]       # job -> extra deletions, in order
    reasons: dict[Path, str]
    over_quota: bool
    kept_bytes: int
    plans: dict[str, RotationPlan] = field(default_factory=dict)   # each job's plan with its extras


def plan_disk_quota(plans: Mapping[str, RotationPlan], disk_quota: int | None) -> DiskQuotaPlan:
    """Extra deletions so that all jobs together fit `disk_quota`, after their own plans.

    Takes from every job's ladder stage by stage (keep_every, keep_best, keep_last), the
    globally oldest (by mtime) first within a stage. Protected checkpoints are never taken
    (they are not on any ladder). `plans` of the result: each job's plan with its extra
    deletions appended and `over_quota` set when the daemon-wide quota cannot be met.
    """
    total = sum(p.kept_bytes for p in plans.values())
    out: dict[str, list[CheckpointInfo]] = {job: [] for job in plans}
    reasons: dict[Path, str] = {}
    if disk_quota is not None and total > disk_quota:
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
    over = disk_quota is not None and total > disk_quota
    merged = {}
    for job, p in plans.items():
        extra = out[job]
        gone = {i.path for i in extra}
        merged[job] = RotationPlan(
            delete=p.delete + extra,
            kept={k: v for k, v in p.kept.items() if k not in gone},
            reasons={**p.reasons, **{i.path: reasons[i.path] for i in extra}},
            over_quota=p.over_quota or over,
            total_bytes=p.total_bytes,
            kept_bytes=p.kept_bytes - sum(i.bytes for i in extra),
            quota=p.quota if not over or disk_quota is None else min(p.quota or disk_quota, disk_quota),
            ladder=tuple((s_, i) for s_, i in p.ladder if i.path not in gone),
        )
    return DiskQuotaPlan(out, reasons, over, total, merged)
