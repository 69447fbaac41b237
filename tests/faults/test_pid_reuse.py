"""A pid in the state database that now belongs to a stranger is never signalled: the
daemon checks the start time recorded with it before it touches the process (or its
process group, which for a session leader has the same number)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
from conftest import wait_for
from trainsup.daemon.state import StateDB

# Records every catchable signal it gets; SIGKILL shows as death.
STRANGER = r"""
import os, signal, sys, time
log = sys.argv[1]
def note(s, f):
    with open(log, "a") as fh:
        fh.write(signal.Signals(s).name + "\n")
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
          signal.SIGQUIT, signal.SIGCONT, signal.SIGALRM):
    signal.signal(s, note)
open(log + ".ready", "w").close()
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("ctime", ["mismatch", "missing"])
def test_stale_pid_of_a_stranger_is_never_signalled(daemon, ctime):
    log = daemon.root / "stranger.log"
    # Its own session, like a job leader: pid == pgid, so a killpg(pid) would reach it too.
    stranger = subprocess.Popen([sys.executable, "-c", STRANGER, str(log)], start_new_session=True)
    try:
        wait_for(lambda: (daemon.root / "stranger.log.ready").exists(), 10, "the stranger to start")
        real = psutil.Process(stranger.pid).create_time()
        db = StateDB(daemon.state)
        db.save_job("reuse", {"attempt": 3, "restarts": 2, "state": "running", "pid": stranger.pid,
                              "pid_ctime": real - 1000.0 if ctime == "mismatch" else None})
        db.close()
        daemon.fakejob("reuse", "--catch-usr1", extra="stop_timeout: 1s\n")
        daemon.start()
        st = daemon.wait_state("reuse", "running")
        assert st["pid"] != stranger.pid
        daemon.wait_ready("reuse")
        # Exercise every path that signals: a save request, then a stop and a restart.
        assert daemon.request("checkpoint", "reuse", wait=True, timeout=10)["ok"]
        assert daemon.request("restart", "reuse", no_save=True)["ok"]
        daemon.wait_ready("reuse", 2)
        t0 = time.monotonic()
        wait_for(lambda: time.monotonic() - t0 > 0.5, 2, "a settle window")
        assert stranger.poll() is None, f"the stranger died: {stranger.returncode}"
        got = log.read_text() if log.exists() else ""
        assert got == "", f"the stranger (pid {stranger.pid}) was signalled: {got.split()}"
        assert not any(e["kind"] == "orphan-stopped" for e in daemon.history("reuse"))
    finally:
        stranger.kill()
        stranger.wait()
