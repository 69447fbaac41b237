"""What survives what (issue 21), over every job state the state DB can hold × every way a
daemon goes away: SIGKILL (a crash, the OOM killer), `trainsup reexec` (an upgrade) and
SIGTERM (`systemctl stop`, a shutdown). The daemon always starts again, and each job ends
in the state the README's "Behaviour worth knowing" promises:

| state before     | SIGKILL, start again      | reexec                      | SIGTERM, start again        |
|------------------|---------------------------|-----------------------------|-----------------------------|
| running          | same process, taken over  | same process, taken over    | saved, stopped; resumed     |
| saving, stopping | the stop is finished      | refused until they are done | the stop is finished        |
| backoff          | launched again            | launched again              | preempted; resumed          |
| starting (no process) | launched             | (at the first start)        |                             |
| stopped, finished, failed | kept             | kept                        | kept                        |
| preempted        | resumed                   | resumed                     | resumed                     |

`starting` only lasts the moment before a launch: that row is written into the database
the way a daemon killed in that moment leaves it, with no process, before the first start.
"""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from conftest import REPO
from trainsup.daemon.launch import shim
from trainsup.daemon.state import StateDB

pytestmark = pytest.mark.skipif(shim.why_unavailable() is not None, reason=f"no shim: {shim.why_unavailable()}")

NO_BACKOFF = "restart:\n  backoff: {initial: 0}\n"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_in_background(daemon, name: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainsup", "--socket", str(daemon.socket), "stop", name, *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))


def _every_state(daemon) -> tuple[dict, list[subprocess.Popen]]:
    """A daemon with one job in each state; returns what the jobs were (pid, saves)."""
    daemon.fakejob("running", "--catch-usr1 --print-every 0.1", extra=NO_BACKOFF)
    daemon.fakejob("saving", "--catch-usr1 --save-delay 4", extra="stop_timeout: 5s\n")
    daemon.fakejob("stopping", "--catch-usr1 --ignore-term", extra="stop_timeout: 6s\n")
    daemon.fakejob("backoff", "--every 0.1 --exit 5 --after 0.3", extra="restart:\n  backoff: {initial: 1h, max: 1h}\n")
    daemon.fakejob("stopped", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.fakejob("preempted", "--catch-usr1", extra="stop_timeout: 2s\n")
    daemon.fakejob("finished", "--exit 0 --after 0")
    daemon.fakejob("failed", "--exit 3 --after 0", extra="restart:\n  policy: never\n")
    daemon.fakejob("starting", "--catch-usr1", extra=NO_BACKOFF)
    # The row a daemon killed between `starting` and its launch leaves behind.
    db = StateDB(daemon.state)
    db.save_job("starting", {"attempt": 1, "restarts": 0, "state": "starting", "pid": None})
    db.close()
    daemon.start()
    for name in ("running", "saving", "stopping", "stopped", "preempted", "starting"):
        daemon.wait_state(name, "running")
        daemon.wait_ready(name)
    daemon.wait_state("finished", "finished")
    daemon.wait_state("failed", "failed")
    daemon.wait_state("backoff", "backoff", timeout=20)
    assert daemon.request("stop", "stopped")["ok"]
    assert daemon.request("preempt", "preempted")["ok"]
    daemon.wait_state("stopped", "stopped")
    daemon.wait_state("preempted", "preempted")
    stoppers = [_stop_in_background(daemon, "saving"), _stop_in_background(daemon, "stopping", "--no-save")]
    daemon.wait_state("saving", "saving")
    daemon.wait_state("stopping", "stopping")
    before = {n: daemon.status(n) for n in ("running", "saving", "stopping", "backoff", "starting")}
    before["preempted_save"] = [r["path"] for r in daemon.records("preempted") if r["event"] == "saved"][-1]
    return before, stoppers


@pytest.mark.parametrize("how", ["sigkill", "reexec", "sigterm"])
def test_every_state_survives_the_daemon_going_away(daemon, how):
    before, stoppers = _every_state(daemon)
    try:
        if how == "sigkill":
            daemon.kill()
            daemon.start()
        elif how == "reexec":
            r = daemon.cli("reexec")
            assert r.returncode == 1 and "saving, stopping are being saved or stopped" in r.stderr, r.stderr
            daemon.wait_state("saving", "stopped", timeout=20)
            daemon.wait_state("stopping", "stopped", timeout=20)
            r = daemon.cli("reexec")
            assert r.returncode == 0, r.stderr
        else:
            assert daemon.terminate() == 0
            daemon.start()
    finally:
        for p in stoppers:
            p.wait(60)

    run = daemon.wait_state("running", "running")
    if how == "sigterm":
        # Saved and stopped by the stop (preempted), resumed by the next start.
        start = daemon.wait_ready("running", 2)
        assert run["pid"] != before["running"]["pid"] and start["reason"] == "preempt" and start["resume"]
        assert not _alive(before["running"]["pid"])
    else:
        assert (run["pid"], run["attempt"], run["adopted"]) == (before["running"]["pid"], 1, True)
        assert [r["event"] for r in daemon.records("running")] == ["start"]     # nothing asked of it
    for name in ("saving", "stopping"):
        st = daemon.wait_state(name, "stopped", timeout=30)
        assert st["attempt"] == 1 and not _alive(before[name]["pid"]), name
    assert any(r["event"] == "saved" for r in daemon.records("saving"))
    # backoff: launched again (as before issue 21), or preempted by the stop and resumed.
    daemon.wait_state("backoff", "running", "backoff", timeout=20)
    launches = [e for e in daemon.history("backoff") if e["kind"] == "launch"]
    assert len(launches) >= 2 and launches[1]["reason"] == ("preempt" if how == "sigterm" else "crash")
    for name in ("stopped", "finished", "failed"):
        daemon.wait_state(name, name)
    assert daemon.status("finished")["last_exit"]["code"] == 0
    assert daemon.status("failed")["last_exit"]["code"] == 3
    start = daemon.wait_ready("preempted", 2)
    assert start["reason"] == "preempt" and start["resume"] == before["preempted_save"]
    # Launched at the first start (the seeded row: attempt 1 never ran), then like `running`.
    st = daemon.wait_state("starting", "running")
    assert before["starting"]["attempt"] == 2 and before["starting"]["restart_reason"] == "crash"
    assert (st["pid"] == before["starting"]["pid"]) == (how != "sigterm")
    assert daemon.proc.poll() is None
