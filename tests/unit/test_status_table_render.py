"""The status table drawn from the daemon's table view (issue 15 performance): one string
per job, its fields tab-joined (render.TABLE_FIELDS), wall timestamps (`started`,
checkpoint `mtime`) and empty unset fields; free text apart in `notes`. The CLI computes
ages and defaults, so the table reads as it does from the full reply."""

from __future__ import annotations

import time

from trainsup.render import format_status, table_row


def _cols(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name))


def test_table_view_ages_come_from_timestamps():
    now = time.time()
    # name state pid started restarts crashes has_checkpoint step latest mtime invalid bytes
    # quota over_quota rss mem_limit
    view = {"daemon": {}, "rows": [
        table_row("a", "running", 42, int(now - 95), 2, 0, True, 7, "/ck/step-7", int(now - 130), 0, 2048, 4096,
                  False, 3 << 20, None),
        table_row("b", "stopped", None, None, 0, 0, True, None, None, None, 0, 0, None, False, None, None),
        table_row("c", "failed"),
    ], "notes": {"c": {"error": "exit 3", "warnings": ["w1"]}}}
    full = {"daemon": {}, "jobs": [
        {"name": "a", "state": "running", "pid": 42, "uptime_s": 95, "restarts": 2,
         "checkpoint": {"step": 7, "age_s": 130, "bytes": 2048, "quota": 4096}, "memory": {"rss": 3 << 20}},
        {"name": "b", "state": "stopped", "pid": None, "uptime_s": None, "restarts": 0,
         "checkpoint": {"step": None, "latest": None, "age_s": None, "bytes": 0, "quota": None},
         "memory": {"rss": None, "limit": None}},
        {"name": "c", "state": "failed", "error": "exit 3", "warnings": ["w1"]},
    ]}
    assert format_status(view) == format_status(full)
    a = _cols(format_status(view), "a").split()
    assert a[:5] == ["a", "running", "42", "1m35s", "2"], a
    assert "step 7, 2m10s ago" in _cols(format_status(view), "a")
    b = _cols(format_status(view), "b").split()
    assert b[1:5] == ["stopped", "-", "-", "0"] and "none" in b, b
    assert "  c: exit 3" in format_status(view) and "  c: warning: w1" in format_status(view)
