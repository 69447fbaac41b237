"""Property: over random dir contents, sizes, steps, validity, pins and quotas (per job and
daemon-wide), no plan ever deletes a protected, unmanaged, in-progress (live), unknown,
preexisting, alias or newest entry — and nothing at all when nothing is valid."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from trainsup.checkpoint.index import CheckpointInfo, order
from trainsup.checkpoint.rotation import plan_disk_quota, plan_rotation
from trainsup.spec import CheckpointSpec

D = Path("/ck")


@st.composite
def entry(draw, n: int) -> CheckpointInfo:
    kind = draw(st.sampled_from(["step", "torch", "alias", "unmanaged", "tmp"]))
    step = draw(st.one_of(st.none(), st.integers(0, 50))) if kind != "step" else draw(st.integers(0, 50))
    valid = draw(st.booleans()) and kind not in ("unmanaged", "tmp")
    unknown = not valid and kind not in ("unmanaged",) and draw(st.booleans())
    name = {"step": f"step-{step if step is not None else 0:08d}-{n}", "torch": f"ck_{step}_{n}.pt",
            "alias": f"last-v{n}.ckpt", "unmanaged": f"user{n}.bin", "tmp": f"step-{n:08d}.{100 + n}"}[kind]
    path = D / ".trainsup-tmp" / name if kind == "tmp" else D / name
    return CheckpointInfo(
        path=path, name=name, format="unmanaged" if kind == "unmanaged" else "trainsup",
        step=None if kind == "alias" else step, bytes=draw(st.integers(0, 1000)), valid=valid,
        invalid_reason=None if valid else ("unreadable: EIO" if unknown else "broken"),
        metrics={"loss": draw(st.floats(0, 1))} if draw(st.booleans()) else {},
        mtime=draw(st.floats(0, 1e6)), in_progress=kind == "tmp", managed=kind != "unmanaged",
        unknown=unknown, alias=kind == "alias")


@st.composite
def job(draw):
    n = draw(st.integers(0, 14))
    infos = order([draw(entry(i)) for i in range(n)])
    names = [i.name for i in infos]
    live = set(draw(st.lists(st.sampled_from(names), max_size=3))) if names else set()
    pre = set(draw(st.lists(st.sampled_from(names), max_size=3))) if names else set()
    und = {nm: "failed" for nm in (draw(st.lists(st.sampled_from(names), max_size=2)) if names else [])}
    pins = set(draw(st.lists(st.integers(0, 50), max_size=3)))
    spec = CheckpointSpec(dir=D, keep_last=draw(st.integers(1, 4)), keep_best=draw(st.integers(0, 2)),
                          metric="loss", keep_every=draw(st.integers(0, 5)),
                          quota=draw(st.one_of(st.none(), st.integers(0, 3000))))
    return infos, spec, live, pre, und, pins


def _forbidden(infos, live, pre, und, pins) -> set[str]:
    """What must survive: protected by construction."""
    valid = [i for i in infos if i.valid and not i.in_progress and i.managed]
    if not valid:
        return {i.name for i in infos}
    out = {valid[-1].name, max(enumerate(valid), key=lambda t: (t[1].mtime, t[0]))[1].name}
    numbered = [(p, i) for p, i in enumerate(valid) if i.step is not None]
    if numbered:
        out.add(max(numbered, key=lambda t: (t[1].step, t[0]))[1].name)
    for i in infos:
        if (not i.managed or i.unknown or i.alias or i.name in live or i.name in und
                or (i.name in pre and not i.in_progress)
                or (not i.in_progress and i.step is not None and i.step in pins)):
            out.add(i.name)
    return out


@settings(max_examples=400, deadline=None)
@given(job())
def test_no_plan_deletes_a_protected_entry(j):
    infos, spec, live, pre, und, pins = j
    plan = plan_rotation(infos, spec, pinned=pins, live=live, preexisting=pre, undeletable=und)
    deleted = {i.name for i in plan.delete}
    assert not deleted & _forbidden(infos, live, pre, und, pins)
    assert len(deleted) == len(plan.delete)                 # never twice
    assert plan.kept_bytes == sum(i.bytes for i in infos if i.managed) - sum(i.bytes for i in plan.delete)


@settings(max_examples=200, deadline=None)
@given(st.lists(job(), min_size=1, max_size=3), st.integers(0, 5000))
def test_disk_quota_never_takes_a_protected_entry(jobs, disk_quota):
    plans, forbidden = {}, {}
    for n, (infos, spec, live, pre, und, pins) in enumerate(jobs):
        infos = [CheckpointInfo(**{**i.__dict__, "path": Path(f"/j{n}") / i.name}) for i in infos]
        plans[f"j{n}"] = plan_rotation(infos, spec, pinned=pins, live=live, preexisting=pre, undeletable=und)
        forbidden[f"j{n}"] = _forbidden(infos, live, pre, und, pins)
    dq = plan_disk_quota(plans, disk_quota)
    for name, p in dq.plans.items():
        assert not {i.name for i in p.delete} & forbidden[name]
    if not dq.over_quota:
        assert sum(p.kept_bytes for p in dq.plans.values()) <= disk_quota
