"""Goodput per job: the share of wall time since the job's first launch that went into
training that lasted, and where the rest went.

A pure function of the job's recorded events (its history, oldest first) plus, for the
time since the last event, the state it is in now: `goodput(events, now, state)`. The
daemon keeps the same computation incrementally (`GoodputBook`, fed each event as it is
recorded, persisted with the job's row), so `status` on 200 jobs costs a few additions per
job, not a replay of 200 histories; the plot replays a history itself.

Every second between the first launch and now goes to exactly one part (wall = the sum):

  productive      a process of the job ran and trained, and that work was kept
  recomputed      training the next attempt redid: the interrupted attempt's training
                  after the checkpoint the next attempt resumed from (all of it when it
                  resumed from an older checkpoint, or started over with none; none for a
                  job without `checkpoint:`, since where it resumes is unknown then)
  resume          from a launch to the attempt's first step (imports, building the model,
                  restoring the checkpoint; the first launch's start-up too): up to the
                  `first-step` event, which jobs that write their step to the heartbeat
                  file produce; for other jobs this time stays productive
  restart         the job was down between attempts: stopping it, the exit until the
                  relaunch (backoff apart), and a daemon or machine that was down
  backoff         the restart policy's wait before a relaunch
  save_emergency  saves the daemon asked for: the `saving` phase of a stop or preemption,
                  and requested checkpoints (`trainsup checkpoint`, memory pressure)
  save_periodic   saves the job made on its own, as long as they held training up: the
                  manifest's `save_s` (trainsup.training writes it; an async save counts
                  only its snapshot); other formats do not say, and count as training
  queue           waiting to run again: `preempted` (until started) and `pending`

The clock stops while the job is `stopped`, `finished`, `failed` or `invalid`: nobody
asked it to run then. Times are the events' wall times; an interval the wall clock ran
backwards over counts as nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PRODUCTIVE = "productive"
PARTS = ("recomputed", "resume", "restart", "backoff", "save_emergency", "save_periodic", "queue")
ALL = (PRODUCTIVE, *PARTS)

_QUEUE = frozenset({"pending", "preempted"})
_IDLE = frozenset({"stopped", "finished", "failed", "invalid"})
_MARKS = 256                       # checkpoints of one attempt remembered for `recomputed`


@dataclass(frozen=True)
class Goodput:
    """The breakdown as of `as_of`; `open_part` is where time after `as_of` goes."""
    since: float | None                       # the first launch (wall time); None: never launched
    seconds: Mapping[str, float] = field(default_factory=dict)
    as_of: float = 0.0
    open_part: str | None = None

    @property
    def wall_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def ratio(self) -> float | None:
        wall = self.wall_s
        return self.seconds.get(PRODUCTIVE, 0.0) / wall if wall > 0 else None

    def advanced(self, now: float) -> Goodput:
        """The same breakdown `now` (time since `as_of` added to the open part)."""
        if self.open_part is None or now <= self.as_of:
            return self
        secs = dict(self.seconds)
        secs[self.open_part] = secs.get(self.open_part, 0.0) + now - self.as_of
        return Goodput(self.since, secs, now, self.open_part)

    def as_dict(self) -> dict[str, Any] | None:
        """What `status --json` shows: {ratio, wall_s, productive_s, lost_s: {part: s}, since}."""
        if self.since is None:
            return None
        r = self.ratio
        return {"ratio": round(r, 4) if r is not None else None, "wall_s": round(self.wall_s, 3),
                "productive_s": round(self.seconds.get(PRODUCTIVE, 0.0), 3),
                "lost_s": {p: round(self.seconds.get(p, 0.0), 3) for p in PARTS}, "since": self.since}


class GoodputBook:
    """The incremental form: feed() each event of one job in order; at() is O(1)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.t: float | None = None          # the newest event fed
        self.state: str | None = None
        self.alive = False                   # a process of the job runs (launch .. exit)
        self.stepping = False                # this attempt reported its first step
        self.reports = False                 # the job reports its steps (a first-step was seen)
        self.checkpoints = False             # trainsup has indexed a checkpoint of this job
        self.secs = dict.fromkeys(ALL, 0.0)
        self.attempt = 0.0                   # productive seconds of the current (or last) attempt
        self.launched: float | None = None   # when that attempt was launched
        self.marks: dict[str, float] = {}    # checkpoint path -> `attempt` when it was indexed
        self.step_marks: dict[int, float] = {}

    # -- feeding ---------------------------------------------------------------------
    def _part(self, state: str | None) -> str | None:
        """Where time spent in `state` goes now (None: the clock is stopped)."""
        if self.since is None or state is None or state in _IDLE:
            return None
        if state in _QUEUE:
            return "queue"
        if state == "backoff":
            return "backoff"
        if state == "saving":
            return "save_emergency"
        if state == "running" and self.alive:
            # Before the first step of a job known to report steps: resuming. Otherwise
            # training, until a first-step says how much of it was resuming.
            return "resume" if self.reports and not self.stepping else PRODUCTIVE
        return "restart"                    # starting, stopping, an exit not yet decided on

    def _add(self, part: str | None, seconds: float) -> None:
        if part is None or seconds <= 0:
            return
        self.secs[part] += seconds
        if part == PRODUCTIVE:
            self.attempt += seconds

    def _move(self, seconds: float, to: str) -> None:
        """Reclassify up to `seconds` of this attempt's productive time."""
        moved = max(0.0, min(seconds, self.attempt, self.secs[PRODUCTIVE]))
        self.secs[PRODUCTIVE] -= moved
        self.secs[to] += moved
        self.attempt -= moved

    def feed(self, ev: Mapping[str, Any]) -> None:
        at, kind = float(ev["at"]), ev.get("kind")
        if self.t is not None and at > self.t:
            part = self._part(self.state)
            if kind == "state" and ev.get("from") == "pending" and self.state not in (None, "pending"):
                # A Job starts at `pending` only when the daemon starts (or re-reads it):
                # the daemon, or the machine, was down since the last record.
                if self.state not in _IDLE and self.state not in _QUEUE:
                    part = "restart"
                self.alive = False
            self._add(part, at - self.t)
        if self.t is None or at > self.t:
            self.t = at
        if kind == "state":
            to = ev.get("to")
            if to == "starting" and self.since is None:
                self.since = at                 # the clock starts at the first launch
            self.state = str(to) if to is not None else None
        elif kind == "launch":
            self._launched(ev)
        elif kind == "exit":
            self.alive = False
        elif kind == "first-step":
            if self.alive and not self.stepping:
                self._move(self.attempt, "resume")
                self.stepping = self.reports = True
        elif kind == "checkpoint":
            self._checkpoint(ev)

    def _launched(self, ev: Mapping[str, Any]) -> None:
        if self.since is None:
            self.since = float(ev["at"])
        self.launched = float(ev["at"])
        resume, step = ev.get("resume_from"), ev.get("resume_step")
        if self.attempt > 0 and (resume is not None or ev.get("from_scratch") or self.checkpoints):
            # The last attempt's training after the checkpoint this one resumes from is
            # redone; a checkpoint it did not write (or none) means all of it.
            kept = self.marks.get(str(resume)) if resume is not None else None
            if kept is None and isinstance(step, int):
                kept = self.step_marks.get(step)
            self._move(self.attempt - (kept or 0.0), "recomputed")
        self.attempt = 0.0
        self.marks.clear()
        self.step_marks.clear()
        self.alive, self.stepping = True, False

    def _checkpoint(self, ev: Mapping[str, Any]) -> None:
        self.checkpoints = True
        mtime = ev.get("mtime")
        if self.launched is None or (isinstance(mtime, (int, float)) and mtime < self.launched - 1):
            return   # older than this attempt (the daemon indexes every checkpoint when it starts)
        requested = isinstance(ev.get("took_s"), (int, float))
        held = ev.get("save_s") if isinstance(ev.get("save_s"), (int, float)) else ev.get("took_s") if requested else None
        if held and self.state != "saving":   # a stop's save is its `saving` phase already
            self._move(float(held), "save_emergency" if requested else "save_periodic")
        path, step = ev.get("path"), ev.get("step")
        if path:
            _remember(self.marks, str(path), self.attempt)
        if isinstance(step, int):
            _remember(self.step_marks, step, self.attempt)

    # -- reading ---------------------------------------------------------------------
    def at(self, now: float, state: str | None = None) -> Goodput:
        """The breakdown `now`; `state` (the job's state now) decides the time since the
        last event when given, else the last state recorded."""
        part = self._part(state if state is not None else self.state)
        g = Goodput(self.since, dict(self.secs), self.t if self.t is not None else now, part)
        return g.advanced(now)

    # -- persistence (the job's row in the state db) ----------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"since": self.since, "t": self.t, "launched": self.launched, "state": self.state, "alive": self.alive,
                "stepping": self.stepping, "reports": self.reports, "checkpoints": self.checkpoints,
                "secs": dict(self.secs), "attempt": self.attempt,
                "marks": list(self.marks.items()), "step_marks": list(self.step_marks.items())}

    @classmethod
    def restore(cls, data: Any) -> GoodputBook:
        """A book from snapshot(); a fresh one for anything unreadable (an older state db)."""
        b = cls()
        if not isinstance(data, dict):
            return b
        try:
            b.since = None if data.get("since") is None else float(data["since"])
            b.t = None if data.get("t") is None else float(data["t"])
            b.launched = None if data.get("launched") is None else float(data["launched"])
            b.state = data.get("state") if isinstance(data.get("state"), str) else None
            b.alive, b.stepping = bool(data.get("alive")), bool(data.get("stepping"))
            b.reports, b.checkpoints = bool(data.get("reports")), bool(data.get("checkpoints"))
            secs = data.get("secs") or {}
            b.secs = {p: float(secs.get(p, 0.0)) for p in ALL}
            b.attempt = float(data.get("attempt", 0.0))
            b.marks = {str(k): float(v) for k, v in data.get("marks") or []}
            b.step_marks = {int(k): float(v) for k, v in data.get("step_marks") or []}
        except (TypeError, ValueError):
            return cls()
        return b


def _remember(marks: dict, key: Any, value: float) -> None:
    marks.pop(key, None)                     # re-indexed: now the newest
    marks[key] = value
    if len(marks) > _MARKS:
        marks.pop(next(iter(marks)))


def goodput(events: Iterable[Mapping[str, Any]], now: float, state: str | None = None) -> Goodput:
    """The job's goodput `now`, from its events (oldest first) and its state now."""
    book = GoodputBook()
    for ev in events:
        book.feed(ev)
    return book.at(now, state)


def series(events: Iterable[Mapping[str, Any]], end: float | None = None) -> list[Goodput]:
    """The breakdown after each event (and at `end`): what the plot stacks over time."""
    book = GoodputBook()
    out: list[Goodput] = []
    for ev in events:
        book.feed(ev)
        if book.since is not None:
            out.append(book.at(float(ev["at"])))
    if end is not None and book.since is not None:
        out.append(book.at(end))
    return out
