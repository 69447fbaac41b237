"""Wall-clock jumps (an NTP step, a VM resumed) must not shorten or lengthen the daemon's
timers: backoff, grace and hang run on the monotonic clock.

The daemon runs under libfaketime with FAKETIME_DONT_FAKE_MONOTONIC=1 and a timestamp file
the test rewrites: its wall clock jumps by days while CLOCK_MONOTONIC goes on, as on a real
machine. The jobs do not inherit LD_PRELOAD (the daemon strips it), so the times they record
are real ones; every duration is measured from those.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

LIBS = [Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
        Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
        Path("/usr/lib/faketime/libfaketime.so.1")]
LIB = next((p for p in LIBS if p.exists()), None)
pytestmark = pytest.mark.skipif(LIB is None, reason="libfaketime is not installed (apt-get install faketime)")

BACKOFF = 2.0
HANG = 2.0
GRACE = 2.0


def _recs(d, job, event):
    return [r for r in d.records(job) if r["event"] == event]


def test_wall_clock_jumps_do_not_move_backoff_grace_or_hang(daemon):
    offset = daemon.root / "faketime"
    offset.write_text("+0\n")
    daemon.fakejob("bo", "--exit 3 --after 0.3", ckpt=False,
                   extra=f"restart:\n  max_restarts: 10\n  max_restarts_without_progress: 10\n"
                         f"  backoff: {{initial: {BACKOFF}s, factor: 1, max: {BACKOFF}s}}\n")
    daemon.fakejob("hung", "--heartbeat-for 0.5", ckpt=False,
                   extra=f"hang:\n  timeout: {HANG}s\nemergency_save:\n  grace: 0.3s\nstop_timeout: 0.5s\n")
    daemon.fakejob("gr", "--usr1-no-save",
                   extra=f"autostart: false\nemergency_save:\n  grace: {GRACE}s\nstop_timeout: 1s\n")
    daemon.start(env={"LD_PRELOAD": str(LIB), "FAKETIME_TIMESTAMP_FILE": str(offset),
                      "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})

    # Backoff: the wall clock jumps a day forward, then two days back, mid-backoff.
    gaps = []
    for n, jump in ((1, "+1d"), (2, "-1d")):
        wait_for(lambda: len(_recs(daemon, "bo", "exit")) >= n, 15, f"exit #{n}")
        offset.write_text(jump + "\n")
        wait_for(lambda: len(_recs(daemon, "bo", "start")) >= n + 1, 15, f"start #{n + 1}")
        gaps.append(_recs(daemon, "bo", "start")[n]["t"] - _recs(daemon, "bo", "exit")[n - 1]["t"])
    assert all(BACKOFF - 0.05 <= g < BACKOFF + 1.5 for g in gaps), f"backoff {BACKOFF}s became {gaps}"

    # The jump really reached the daemon: its records carry the faked wall time.
    launch = [e for e in daemon.history("bo") if e["kind"] == "launch"][1]
    assert abs(launch["at"] - _recs(daemon, "bo", "start")[1]["t"] - 86400) < 60, launch

    # Hang: the heartbeat stopped 0.5 s after the start, across the jumps above.
    starts = wait_for(lambda: len(s := _recs(daemon, "hung", "start")) >= 2 and s, 20, "the hang restart")
    silent = starts[1]["t"] - (starts[0]["t"] + 0.5)
    assert starts[1]["reason"] == "hang"
    assert HANG - 0.1 <= silent < HANG + 4, f"hang timeout {HANG}s fired after {silent:.2f}s of silence"

    # Grace: a stop waits the whole grace for a save that never comes, jump or not.
    offset.write_text("+0\n")
    assert daemon.request("start", "gr")["ok"]
    daemon.wait_ready("gr")
    out = {}

    def stop():
        t0 = time.monotonic()
        out["r"] = daemon.request("stop", "gr")
        out["took"] = time.monotonic() - t0
    th = threading.Thread(target=stop)
    th.start()
    wait_for(lambda: daemon.status("gr")["state"] == "saving", 5, "the save phase")
    offset.write_text("+2d\n")
    th.join(30)
    assert out["r"]["ok"], out
    assert out["r"]["result"]["outcome"] == f"no save within {GRACE:g}s"
    assert GRACE - 0.05 <= out["took"] < GRACE + 3, f"grace {GRACE}s took {out['took']:.2f}s"
    print(f"backoff gaps {[round(g, 2) for g in gaps]}, hang after {silent:.2f}s, grace {out['took']:.2f}s")
