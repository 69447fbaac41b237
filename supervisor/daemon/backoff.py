"""Restart policy: whether and when a job that exited is launched again.

Pure bookkeeping over facts (exit codes, monotonic timestamps, checkpoint progress), with
no processes and no sleeps, so every rule has a table-driven test. Unlike supervisord,
which only counts exits within `startsecs` (so a job crashing after 5 minutes loops
forever), every crash counts toward `max_restarts` within `window`. A job that exits 0 at
once under `restart.policy: always` backs off too, and every automatic relaunch counts
toward a start-rate limit (systemd's StartLimitBurst): 939 launches/s became `failed`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from ..spec import RestartSpec
from .rowgen import RowFields


@dataclass
class Decision:
    restart: bool
    delay: float = 0.0
    final_state: str | None = None   # "finished" | "failed" when not restarting
    why: str = ""


@dataclass
class RestartTracker(RowFields):
    # `status` shows the crash streak (rowgen.py): assigning it re-makes the job's row
    ROW_FIELDS: ClassVar[frozenset[str]] = frozenset({"consecutive"})
    spec: RestartSpec
    crash_times: deque = field(default_factory=deque)   # monotonic times of crashes
    consecutive: int = 0                                 # crashes since last progress/stable run
    without_progress: int = 0                            # crashes in a row with no new checkpoint
    starts: deque = field(default_factory=deque)         # monotonic times of automatic relaunches

    def progress(self) -> None:
        """A new valid checkpoint landed (or a person started the job): the job is making
        progress, so its crash streak and its recent starts are forgiven."""
        self.consecutive = 0
        self.without_progress = 0
        self.starts.clear()

    def delay_for(self, consecutive: int) -> float:
        """initial * factor**(consecutive-1), capped at max. Compared in log space: the
        power itself overflows (factor 1e300 on the 3rd crash, factor 2 after 1025)."""
        b = self.spec.backoff
        if consecutive <= 0 or not b.initial > 0:
            return 0.0
        cap = b.max if b.max >= 0 else 0.0
        if b.initial >= cap:
            return cap
        factor = b.factor if b.factor > 1 else 1.0
        exponent = math.log(b.initial) + (consecutive - 1) * math.log(factor)
        if exponent >= math.log(cap) or exponent > 700:     # e**709 is the float limit
            return cap
        return b.initial * factor ** (consecutive - 1)

    def _start_limited(self, now: float) -> Decision | None:
        """Record one automatic relaunch at `now`; a Decision to fail when it is one too
        many within the start-limit interval."""
        s = self.spec
        if s.start_limit_interval <= 0:
            return None
        while self.starts and now - self.starts[0] >= s.start_limit_interval:
            self.starts.popleft()
        if len(self.starts) >= s.start_limit_burst:
            return Decision(False, final_state="failed",
                            why=f"started {len(self.starts)} times within {s.start_limit_interval:g}s "
                                f"(start_limit_burst {s.start_limit_burst})")
        self.starts.append(now)
        return None

    def on_exit(self, *, crashed: bool, now: float, ran_for: float) -> Decision:
        s = self.spec
        if not crashed:
            if s.policy != "always":
                return Decision(False, final_state="finished", why="exited 0")
            # A clean run shorter than the start-limit interval is a quick exit: it backs
            # off like a crash (without counting as one); a longer run starts afresh.
            if ran_for >= s.start_limit_interval:
                self.consecutive = 0
            else:
                self.consecutive += 1
            return self._start_limited(now) or \
                Decision(True, self.delay_for(self.consecutive), why="exited 0; policy always")
        if s.policy == "never":
            return Decision(False, final_state="failed", why="crashed; restart policy is never")
        # A run that lasted a whole window without crashing resets the backoff.
        if ran_for >= s.window:
            self.consecutive = 0
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > s.window:
            self.crash_times.popleft()
        self.consecutive += 1
        self.without_progress += 1
        if len(self.crash_times) > s.max_restarts:
            return Decision(False, final_state="failed",
                            why=f"{len(self.crash_times)} crashes within {s.window:g}s (max_restarts {s.max_restarts})")
        if s.max_restarts_without_progress and self.without_progress >= s.max_restarts_without_progress:
            return Decision(False, final_state="failed",
                            why=f"{self.without_progress} crashes in a row without a new valid checkpoint "
                                f"(max_restarts_without_progress {s.max_restarts_without_progress})")
        return self._start_limited(now) or Decision(True, self.delay_for(self.consecutive), why="crashed")

    def on_stopped_elsewhere(self, now: float) -> Decision:
        """The attempt ended because another node's preemption stopped the group (its last
        save says so): not a crash and not the end of the run. Relaunched at once, to
        rejoin; only the start-rate limit applies."""
        return self._start_limited(now) or Decision(True, 0.0, why="stopped by a preemption elsewhere")

    def snapshot(self) -> dict:
        return {"consecutive": self.consecutive, "without_progress": self.without_progress}

    def restore(self, data: dict) -> None:
        self.consecutive = int(data.get("consecutive", 0))
        self.without_progress = int(data.get("without_progress", 0))
