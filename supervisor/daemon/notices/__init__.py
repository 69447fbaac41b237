"""Sources of notices: things that tell the daemon a job must save or stop (SPEC section 7).

Every source runs on its own thread (or APScheduler's, or watchdog's) and does one thing
with what it finds: calls the callback it was given. The daemon's callback only posts to
its event loop (`loop.call_soon_threadsafe`), so no source ever touches daemon state.
The submodules are imported on demand so the daemon pays only for the sources it uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    source: str                  # aws | gcp | azure | trigger-file | cron | ...
    kind: str                    # preempt | maintenance | warning
    deadline: float | None    # UTC epoch seconds by which the machine goes away
    detail: str                  # one line for logs and `trainsup history`
    event_id: str | None = None   # Azure Scheduled Events id, for acknowledge()

    def identity(self) -> tuple:
        """What makes two sightings the same notice.

        The deadline is left out on purpose: GCP gives no time, so its deadline is
        "now + 30 s" and moves on every poll, yet it is still the same preemption.
        """
        return (self.source, self.kind, self.event_id or self.detail)


KINDS = ("preempt", "maintenance", "warning")
