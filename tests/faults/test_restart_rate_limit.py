"""Restart storms, reproduced as found with a real daemon.

- A job that exits 0 at once under `restart.policy: always` was relaunched 939 times a
  second with the daemon at 84% CPU, never rate-limited, never `failed`.
- `restart.backoff.factor: 1.0e+300` raised OverflowError in the delay computation on the
  third crash, leaving the job wedged in `running` with no pid.
"""

from __future__ import annotations

import time

import psutil
from conftest import wait_for


def _launches(d, job):
    return [e for e in d.history(job, 5000) if e["kind"] == "launch"]


def test_exit_0_under_always_ends_failed_with_few_launches(daemon):
    # No backoff at all, as in the report: the start-rate limit alone must end it.
    daemon.write_job("quick", f"name: quick\ncommand: ['true']\nworkdir: {daemon.root}\n"
                              "restart:\n  policy: always\n  backoff: {initial: 0s}\n")
    daemon.start()
    p = psutil.Process(daemon.proc.pid)
    cpu0 = sum(p.cpu_times()[:2])
    st = daemon.wait_state("quick", "failed", timeout=20)
    assert "start_limit_burst" in st["error"], st["error"]
    n = len(_launches(daemon, "quick"))
    assert n <= 6, f"{n} launches before failing"
    # "Must not happen" over a settle window: no more launches, the daemon idle.
    p.cpu_percent(None)
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 1.0, 3, "a one-second settle window")
    assert len(_launches(daemon, "quick")) == n
    assert p.cpu_percent(None) < 20.0
    assert sum(p.cpu_times()[:2]) - cpu0 < 3.0


def test_exit_0_under_always_backs_off(daemon):
    daemon.write_job("quick", f"name: quick\ncommand: ['true']\nworkdir: {daemon.root}\n"
                              "restart:\n  policy: always\n  backoff: {initial: 0.05s, factor: 2, max: 1s}\n")
    daemon.start()
    daemon.wait_state("quick", "failed", timeout=20)
    delays = [e["delay"] for e in daemon.history("quick") if e["kind"] == "state" and e["to"] == "backoff"]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4], delays


def test_backoff_factor_1e300_no_exception_job_goes_through_backoff(daemon):
    daemon.write_job("huge", f"name: huge\ncommand: [sh, -c, 'exit 3']\nworkdir: {daemon.root}\n"
                             "restart:\n  max_restarts: 50\n  max_restarts_without_progress: 50\n"
                             "  start_limit_interval: 0s\n"
                             "  backoff: {initial: 0.05s, max: 0.2s, factor: 1.0e+300}\n")
    daemon.start()
    wait_for(lambda: len(_launches(daemon, "huge")) >= 5, 20, "5 launches through the backoff")
    delays = [e["delay"] for e in daemon.history("huge") if e["kind"] == "state" and e["to"] == "backoff"]
    assert delays[:4] == [0.05, 0.2, 0.2, 0.2], delays
    st = daemon.status("huge")
    assert st["state"] in ("backoff", "running", "starting") and st["error"] is None or "exit" in str(st["error"])
    assert "OverflowError" not in daemon.log_text()
