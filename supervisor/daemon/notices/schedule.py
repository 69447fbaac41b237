"""Per-job timed notices from `schedule:` (SPEC section 3): periodic and cron checkpoints,
planned preemptions. APScheduler is only a source of timed events here: its thread calls
`on_fire(job_name, what)` and nothing else. It is imported and started only once a job
has a schedule: ~4.5 MB of the daemon's RSS and a thread that most daemons never need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ...spec import ScheduleSpec

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

log = logging.getLogger("trainsup.notices.schedule")

# The keys of ScheduleSpec, and what each asks the daemon to do.
WHAT = {"checkpoint_every": "checkpoint", "checkpoint_cron": "checkpoint",
        "preempt_cron": "preempt"}


def parse_cron(expr: str) -> CronTrigger:
    """A standard 5-field crontab line, in UTC; ValueError with one line if it is bad."""
    try:
        # APScheduler's from_crontab counts weekday 0 as Monday; crontab(5)
        # counts 0 and 7 as Sunday. Users write crontab lines.
        from ...config.values import crontab_trigger
        return crontab_trigger(expr, timezone=timezone.utc)
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad cron expression {expr!r}: {e}") from None


def triggers_for(spec: ScheduleSpec) -> dict:
    """{ScheduleSpec key: APScheduler trigger} for the keys that are set."""
    out: dict[str, Any] = {}
    if spec.checkpoint_every is not None:
        from apscheduler.triggers.interval import IntervalTrigger
        if spec.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive, not {spec.checkpoint_every}")
        out["checkpoint_every"] = IntervalTrigger(seconds=spec.checkpoint_every,
                                                  timezone=timezone.utc)
    for key in ("checkpoint_cron", "preempt_cron"):
        expr = getattr(spec, key)
        if expr is not None:
            out[key] = parse_cron(expr)
    return out


def preload() -> None:
    """Import APScheduler (off the loop: its import takes tens of ms) before a job's
    schedule makes the scheduler."""
    import apscheduler.executors.pool  # noqa: F401
    import apscheduler.schedulers.background  # noqa: F401
    import apscheduler.triggers.cron  # noqa: F401
    import apscheduler.triggers.interval  # noqa: F401


class JobSchedule:
    """All jobs' schedules on one APScheduler BackgroundScheduler, in UTC."""

    def __init__(self, on_fire: Callable[[str, str], None]):
        self.on_fire = on_fire
        self._scheduler: Any = None         # made at the first schedule
        self._started = False               # start() was called: run it once it exists

    def _made(self) -> Any:
        if self._scheduler is None:
            from apscheduler.executors.pool import ThreadPoolExecutor
            from apscheduler.schedulers.background import BackgroundScheduler
            self._scheduler = BackgroundScheduler(
                timezone=timezone.utc,
                # on_fire only posts to the daemon's loop: one worker is plenty, and keeps
                # fires of one job in order.
                executors={"default": ThreadPoolExecutor(max_workers=1)},
                # A daemon that was suspended owes one save, not one per missed interval.
                job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60})
            if self._started:
                self._scheduler.start()
        return self._scheduler

    def start(self) -> None:
        self._started = True
        if self._scheduler is not None and not self._scheduler.running:
            self._scheduler.start()

    def stop(self) -> None:
        self._started = False
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _fire(self, name: str, what: str) -> None:
        try:
            self.on_fire(name, what)
        except Exception:
            log.exception("schedule callback failed for job %s (%s)", name, what)

    def set_job(self, name: str, spec: ScheduleSpec) -> None:
        """Replace every trigger of job `name` by those of `spec` (none: just remove)."""
        triggers = triggers_for(spec)          # raises before anything is removed
        self.remove_job(name)
        for key, trigger in triggers.items():
            self._made().add_job(self._fire, trigger, args=(name, WHAT[key]),
                                    id=f"{name}:{key}", name=f"{name} {key}",
                                    replace_existing=True)

    def remove_job(self, name: str) -> None:
        if self._scheduler is None:
            return
        for job in self._scheduler.get_jobs():
            if job.id.startswith(name + ":"):
                job.remove()

    def next_fire_times(self, name: str) -> dict[str, datetime | None]:
        """{ScheduleSpec key: next fire time (UTC)} of job `name`; for status displays."""
        out: dict[str, datetime | None] = {}
        for job in (self._scheduler.get_jobs() if self._scheduler is not None else ()):
            if job.id.startswith(name + ":"):
                key = job.id[len(name) + 1:]
                next_time = getattr(job, "next_run_time", None)
                if next_time is None:          # scheduler not started yet
                    next_time = job.trigger.get_next_fire_time(None, datetime.now(timezone.utc))
                out[key] = next_time
        return out
