"""The status table drawn from the daemon's table view (issue 15 performance): rows carry
wall timestamps (`started`, checkpoint `mtime`) and leave unset fields out; the CLI
computes ages and defaults, so the table reads as it did from the full reply."""

from __future__ import annotations

import time

from trainsup.render import format_status


def _cols(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name))


def test_table_view_ages_come_from_timestamps():
    now = time.time()
    view = {"daemon": {}, "jobs": [
        {"name": "a", "state": "running", "pid": 42, "started": now - 95, "restarts": 2,
         "checkpoint": {"step": 7, "mtime": now - 130, "bytes": 2048, "quota": 4096}, "memory": {"rss": 3 << 20}},
        {"name": "b", "state": "stopped", "checkpoint": {"bytes": 0}, "memory": {}},
    ]}
    full = {"daemon": {}, "jobs": [
        {"name": "a", "state": "running", "pid": 42, "uptime_s": 95, "restarts": 2,
         "checkpoint": {"step": 7, "age_s": 130, "bytes": 2048, "quota": 4096}, "memory": {"rss": 3 << 20}},
        {"name": "b", "state": "stopped", "pid": None, "uptime_s": None, "restarts": 0,
         "checkpoint": {"step": None, "latest": None, "age_s": None, "bytes": 0, "quota": None},
         "memory": {"rss": None, "limit": None}},
    ]}
    assert format_status(view) == format_status(full)
    a = _cols(format_status(view), "a").split()
    assert a[:5] == ["a", "running", "42", "1m35s", "2"], a
    assert "step 7, 2m10s ago" in _cols(format_status(view), "a")
    b = _cols(format_status(view), "b").split()
    assert b[1:5] == ["stopped", "-", "-", "0"] and "none" in b, b
