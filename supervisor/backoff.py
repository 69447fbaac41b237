"""Restart policy: whether and when a job that exited is launched again.

Pure bookkeeping over facts (exit codes, monotonic timestamps, checkpoint progress), with
no processes and no sleeps, so every rule has a table-driven test. Unlike supervisord,
which only counts exits within `startsecs` (so a job crashing after 5 minutes loops
forever), every crash counts toward `max_restarts` within `window`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .spec import RestartSpec


@dataclass
class Decision:
    restart: bool
    delay: float = 0.0
    final_state: str | None = None   # "finished" | "failed" when not restarting
    why: str = ""


@dataclass
class RestartTracker:
    spec: RestartSpec
    crash_times: deque = field(default_factory=deque)   # monotonic times of crashes
    consecutive: int = 0                                 # crashes since last progress/stable run
    without_progress: int = 0                            # crashes in a row with no new checkpoint

    def progress(self) -> None:
        """A new valid checkpoint landed: the job is making progress."""
        self.consecutive = 0
        self.without_progress = 0

    def delay_for(self, consecutive: int) -> float:
        b = self.spec.backoff
        if consecutive <= 0 or b.initial <= 0:
            return 0.0
        return min(b.max, b.initial * (b.factor ** (consecutive - 1)))

    def on_exit(self, *, crashed: bool, now: float, ran_for: float) -> Decision:
        s = self.spec
        if not crashed:
            if s.policy == "always":
                self.consecutive = 0
                return Decision(True, self.delay_for(0), why="exited 0; policy always")
            return Decision(False, final_state="finished", why="exited 0")
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
        return Decision(True, self.delay_for(self.consecutive), why="crashed")

    def snapshot(self) -> dict:
        return {"consecutive": self.consecutive, "without_progress": self.without_progress}

    def restore(self, data: dict) -> None:
        self.consecutive = int(data.get("consecutive", 0))
        self.without_progress = int(data.get("without_progress", 0))
