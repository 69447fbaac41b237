"""Goodput from a job's history (daemon/goodput.py): table-driven, one history per row,
each the events the daemon records for that story, with the seconds each part must get.
Every row also checks that the parts add up to the wall time since the first launch, and
that the incremental book (fed live, persisted and restored halfway) agrees with a replay
of the history."""

from __future__ import annotations

import json

import pytest
from trainsup.daemon.goodput import ALL, PARTS, PRODUCTIVE, GoodputBook, goodput, series


def E(at: float, kind: str, **data) -> dict:
    return {"at": at, "kind": kind, **data}


def S(at: float, frm: str, to: str, **data) -> dict:
    return E(at, "state", **{"from": frm, "to": to}, **data)


def launch(at: float, attempt: int, resume: str | None = None, step: int | None = None,
           scratch: bool = False) -> list[dict]:
    """What _spawn records: the launch, then running."""
    ev = E(at, "launch", attempt=attempt, pid=100 + attempt, reason="first" if attempt == 1 else "crash",
           resume_from=resume, **({"resume_step": step} if step is not None else {}),
           **({"from_scratch": True} if scratch else {}))
    return [ev, S(at, "starting", "running")]


CK = "/ck/step-00000010"

# (id, events, now, state now, {part: seconds}); parts not named must be 0
CASES = [
    ("never launched", [S(0, "pending", "stopped")], 50, None, None),
    ("a job that reports steps: launch to first step is resume",
     [S(0, "pending", "starting"), *launch(1, 1), E(5, "first-step", attempt=1, step=1)],
     11, "running", {"restart": 1, "resume": 4, PRODUCTIVE: 6}),
    ("a job that reports no steps: all of its run is training",
     [S(0, "pending", "starting"), *launch(0, 1)], 30, "running", {PRODUCTIVE: 30}),
    ("a crash after a checkpoint: the training past it is recomputed",
     [S(0, "pending", "starting"), *launch(0, 1), E(2, "first-step", attempt=1, step=1),
      E(6, "checkpoint", step=10, path=CK, mtime=5.9), E(9, "exit", attempt=1, reason="signal SIGKILL"),
      S(9.5, "running", "backoff", delay=3), S(12.5, "backoff", "starting"), *launch(13, 2, CK, 10),
      E(15, "first-step", attempt=2, step=11)],
     20, "running", {"resume": 4, PRODUCTIVE: 9, "recomputed": 3, "restart": 1, "backoff": 3}),
    ("a resume from an older checkpoint than the attempt wrote: all of the attempt is recomputed",
     [S(0, "pending", "starting"), *launch(0, 1), E(4, "checkpoint", step=10, path=CK, mtime=3.9),
      E(8, "exit", attempt=1), S(8, "running", "backoff", delay=0), S(8, "backoff", "starting"),
      *launch(8, 2, "/ck/step-00000005", 5), E(10, "exit", attempt=2), S(10, "running", "failed")],
     100, "failed", {PRODUCTIVE: 2, "recomputed": 8}),
    ("a preemption with an emergency save: nothing recomputed, the wait is queue time",
     [S(0, "pending", "starting"), *launch(0, 1), S(10, "running", "saving", source="manual"),
      E(12, "checkpoint", step=20, path="/ck/step-00000020", mtime=11.9, took_s=2.0, save_s=1.8),
      S(12, "saving", "stopping"), E(13, "exit", attempt=1, reason="exit 0"),
      E(13, "notice", source="manual", outcome="saved", noticed_at=10), S(13, "stopping", "preempted"),
      S(40, "preempted", "starting"), *launch(41, 2, "/ck/step-00000020", 20)],
     50, "running", {PRODUCTIVE: 19, "save_emergency": 2, "restart": 2, "queue": 27}),
    ("periodic saves the manifest timed, and a requested one, are save overhead",
     [S(0, "pending", "starting"), *launch(0, 1),
      E(10, "checkpoint", step=100, path="/c/100", mtime=10, save_s=0.5),
      E(20, "save-requested", pids=[101]),
      E(21, "checkpoint", step=200, path="/c/200", mtime=21, took_s=1.25)],
     30, "running", {PRODUCTIVE: 28.25, "save_periodic": 0.5, "save_emergency": 1.25}),
    ("the clock stops while the job is stopped, and runs again when it is started",
     [S(0, "pending", "starting"), *launch(0, 1), S(10, "running", "stopping"), E(11, "exit", attempt=1),
      S(11, "stopping", "stopped"), S(1000, "stopped", "starting"), *launch(1000, 2)],
     1005, "running", {PRODUCTIVE: 15, "restart": 1}),
    ("finished: the figure no longer changes",
     [S(0, "pending", "starting"), *launch(0, 1), E(60, "exit", attempt=1, reason="exit 0"),
      S(60, "running", "finished")], 10_000, "finished", {PRODUCTIVE: 60}),
    ("the daemon died under a running job: the time it was down is restart downtime",
     [S(0, "pending", "starting"), *launch(0, 1), S(100, "pending", "starting", restored=None),
      *launch(101, 2)], 110, "running", {PRODUCTIVE: 9, "restart": 101}),
    ("the daemon stopped (it preempts its jobs): the time until it was back is queue time",
     [S(0, "pending", "starting"), *launch(0, 1), S(5, "running", "stopping"), E(6, "exit", attempt=1),
      S(6, "stopping", "preempted"), S(60, "pending", "starting"), *launch(60, 2)],
     70, "running", {PRODUCTIVE: 15, "restart": 1, "queue": 54}),
    ("checkpoints the daemon finds when it starts are not this attempt's saves",
     [S(0, "pending", "starting"), *launch(0, 1),
      E(1, "checkpoint", step=5, path="/c/5", mtime=-500, save_s=30.0)],
     10, "running", {PRODUCTIVE: 10}),
    ("a wall clock that steps back counts nothing for that interval",
     [S(100, "pending", "starting"), *launch(100, 1), E(50, "checkpoint", step=1, path="/c/1", mtime=50)],
     160, "running", {PRODUCTIVE: 60}),
    ("the state now decides the time since the last event (a stop not yet recorded)",
     [S(0, "pending", "starting"), *launch(0, 1)], 20, "stopped", {PRODUCTIVE: 0}),
    ("a crash loop before the first checkpoint: each attempt starts over, so it is recomputed",
     [S(0, "pending", "starting"), *launch(0, 1, scratch=True), E(2, "exit", attempt=1),
      S(2, "running", "backoff", delay=1), S(3, "backoff", "starting"), *launch(3, 2, scratch=True),
      E(5, "exit", attempt=2), S(5, "running", "backoff", delay=2), S(7, "backoff", "starting"),
      *launch(7, 3, scratch=True), E(9, "checkpoint", step=1, path="/c/1", mtime=9)],
     10, "running", {PRODUCTIVE: 3, "recomputed": 4, "backoff": 3}),
    ("a job without `checkpoint:`: where it resumes is unknown, nothing is called recomputed",
     [S(0, "pending", "starting"), *launch(0, 1), E(2, "exit", attempt=1), S(2, "running", "backoff", delay=1),
      S(3, "backoff", "starting"), *launch(3, 2)],
     10, "running", {PRODUCTIVE: 9, "backoff": 1}),
]


def _check(g, want: dict | None) -> None:
    for part in ALL:
        assert g.seconds.get(part, 0.0) == pytest.approx((want or {}).get(part, 0.0), abs=1e-6), (part, dict(g.seconds))


@pytest.mark.parametrize("events,now,state,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_goodput_from_history(events, now, state, want):
    g = goodput(events, now, state)
    _check(g, want)
    if want is None:
        assert g.as_dict() is None and g.ratio is None
        return
    first = min(e["at"] for e in events if e["kind"] == "state" and e["to"] == "starting")
    d = g.as_dict()
    assert d["since"] == first
    assert d["productive_s"] + sum(d["lost_s"].values()) == pytest.approx(d["wall_s"])
    assert set(d["lost_s"]) == set(PARTS)
    wall = sum(want.values())
    assert d["ratio"] == (pytest.approx(want.get(PRODUCTIVE, 0.0) / wall, abs=1e-4) if wall else None)


@pytest.mark.parametrize("events,now,state,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_incremental_book_persisted_halfway_agrees_with_the_replay(events, now, state, want):
    half = len(events) // 2
    book = GoodputBook()
    for ev in events[:half]:
        book.feed(ev)
    # the job's row in the state db is JSON: the book goes through it
    book = GoodputBook.restore(json.loads(json.dumps(book.snapshot())))
    for ev in events[half:]:
        book.feed(ev)
    assert book.at(now, state).seconds == pytest.approx(goodput(events, now, state).seconds)


def test_an_unreadable_snapshot_starts_a_fresh_book():
    for junk in (None, "x", {"secs": {"productive": "lots"}}, {"marks": 5}):
        assert GoodputBook.restore(junk).at(10).as_dict() is None


def test_advanced_adds_the_time_since_to_the_open_part_only():
    g = goodput([S(0, "pending", "starting"), *launch(0, 1)], 10, "running")
    later = g.advanced(25)
    assert later.seconds[PRODUCTIVE] == pytest.approx(25) and later.wall_s == pytest.approx(25)
    assert g.advanced(5) is g                         # never backwards


def test_series_gives_the_breakdown_after_each_event_and_at_the_end():
    events = CASES[3][1]
    out = series(events, end=20)
    assert out[-1].seconds == pytest.approx(goodput(events, 20, "running").seconds)
    assert [round(g.as_of, 3) for g in out] == sorted(round(g.as_of, 3) for g in out)
    assert all(g.wall_s <= out[-1].wall_s + 1e-9 for g in out)
