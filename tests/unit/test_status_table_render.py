"""The status table drawn from the daemon's table view (issue 15 performance): one string
per job, its fields tab-joined (render.TABLE_FIELDS), wall timestamps (`started`,
checkpoint `mtime`) and empty unset fields; free text apart in `notes`. The CLI computes
ages and defaults, so the table reads as it does from the full reply."""

from __future__ import annotations

import time

from trainsup.cli.render import format_status
from trainsup.control.protocol import table_row


def _cols(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name))


def test_table_view_ages_come_from_timestamps():
    now = time.time()
    view = {"daemon": {}, "rows": [
        table_row(name="a", state="running", pid=42, started=int(now - 95), restarts=2, has_checkpoint=True,
                  step=7, latest="/ck/step-7", mtime=int(now - 130), bytes=2048, quota=4096, rss=3 << 20),
        table_row(name="b", state="stopped", restarts=0, crashes_in_a_row=0, has_checkpoint=True, bytes=0),
        table_row(name="c", state="failed"),
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


def test_table_view_rows_leave_out_what_is_unset_and_keep_step_0():
    from trainsup.control.protocol import TABLE_FIELDS, table_rows
    idle = table_row(name="idle", state="running", pid=7, started=100, restarts=0, has_checkpoint=True,
                     bytes=0, rss=5, crashes_in_a_row=0, step=None)
    assert idle == "idle|running|7|100||1|0|5", idle           # trailing empties are not sent
    zero = table_row(name="z", state="running", has_checkpoint=True, step=0, bytes=0)
    (row,) = table_rows({"rows": [zero]})
    assert len(row) == len(TABLE_FIELDS) and dict(zip(TABLE_FIELDS, row))["step"] == "0"
    assert "step 0," in format_status({"rows": [zero], "notes": {}}).splitlines()[1]
