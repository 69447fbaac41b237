"""Issue 15, performance: `trainsup status` asks the daemon for a table view whose rows
each job keeps encoded (re-encoded only when what they show changes) and whose /proc
facts are read at most once a second. These tests check, against a real daemon and
real processes, that the cached table still tells the truth: a state change, a new
checkpoint, a SIGSTOP and a stop all show, and the table view agrees with `--json`."""

from __future__ import annotations

import json
import os
import re
import signal

from conftest import wait_for
from trainsup.control.protocol import TABLE_FIELDS, table_row, table_rows


def _line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.split()[:1] == [name])


def _state(daemon, name: str) -> str:
    return _line(daemon.cli("status").stdout, name).split()[1]


def test_status_table_stays_current_under_caching(daemon):
    daemon.fakejob("cur", "--catch-usr1")
    daemon.start()
    daemon.wait_ready("cur")
    wait_for(lambda: _state(daemon, "cur") == "running", 10, "cur running in the table")
    before = _line(daemon.cli("status").stdout, "cur")
    assert re.search(r"\bnone\b", before), before        # no checkpoint yet

    # A new checkpoint shows at once (the row is rebuilt when the index changes).
    r = daemon.cli("checkpoint", "cur", "--wait", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    step = daemon.status("cur")["checkpoint"]["step"]
    assert step is not None
    assert re.search(rf"step {step}, \d+s ago", _line(daemon.cli("status").stdout, "cur"))

    # A SIGSTOPped job reads `stopped` (within the once-a-second /proc sampling), and
    # `running` again after SIGCONT.
    pid = daemon.status("cur")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _state(daemon, "cur") == "stopped", 10, "the SIGSTOPped job to read stopped")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _state(daemon, "cur") == "running", 10, "the SIGCONTed job to read running")

    # A stop shows at once, with no RSS left over from the dead attempt.
    wait_for(lambda: _line(daemon.cli("status").stdout, "cur").split()[-1] != "-", 10, "an RSS in the table")
    assert daemon.cli("stop", "cur").returncode == 0
    row = _line(daemon.cli("status").stdout, "cur").split()
    assert row[1] == "stopped" and row[2] == "-" and row[-1] == "-", row


def test_status_table_view_agrees_with_json(daemon):
    daemon.fakejob("one", "--catch-usr1")
    daemon.fakejob("two", "--exit 3", extra="restart: {policy: never}\n")
    daemon.write_job("bad", "name: bad\ncommand: 12\n")
    daemon.start()
    daemon.wait_ready("one")
    wait_for(lambda: daemon.status("two")["state"] in ("failed", "finished", "stopped"), 15, "two to end")
    table = daemon.request("status", table=True)
    full = daemon.request("status")
    assert table["ok"] and full["ok"], (table, full)
    rows = {r[0]: dict(zip(TABLE_FIELDS, r)) for r in table_rows(table["result"])}
    notes = table["result"]["notes"]
    for j in full["result"]["jobs"]:
        row = rows[j["name"]]
        assert row["state"] == j["state"], (row, j)
        assert row["pid"] == str(j["pid"] or "")
        assert int(row["restarts"] or 0) == j["restarts"]
        assert (notes.get(j["name"]) or {}).get("error") == (j["error"] or None)
        assert row["step"] == str((j.get("checkpoint") or {}).get("step") or "")
        assert int(row["crashes_in_a_row"] or 0) == (j.get("crashes_in_a_row") or 0)
    assert rows["bad"]["state"] == "invalid"
    assert set(rows) == {"one", "two", "bad"}
    # a value with a tab or newline cannot break a row apart (display only)
    assert table_row(name="a|b", state="x\ny", started=True, bytes=0).split("|") == ["a¦b", "x y", "", "1", "", "", "0"]
    # `status --json` keeps the full documented shape (SPEC section 8), ages included.
    out = json.loads(daemon.cli("status", "--json").stdout)
    one = next(j for j in out["jobs"] if j["name"] == "one")
    assert {"uptime_s", "attempt", "last_exit", "checkpoint", "memory", "since"} <= set(one)
    # The table the CLI prints says the same as --json for every job.
    text = daemon.cli("status").stdout
    for j in out["jobs"]:
        assert _line(text, j["name"]).split()[1] == j["state"], text
