"""Steps lost per interruption: a job that writes its step into TRAINSUP_HEARTBEAT_FILE
gets `last_step` on its exit and `steps_lost` on the next launch, in history and metrics."""

import os
import signal
from pathlib import Path

from conftest import wait_for


def test_steps_lost_after_a_sigkill_is_last_step_minus_the_resumed_step(daemon):
    # fakejob --progress heartbeat writes its step after every step into TRAINSUP_HEARTBEAT_FILE.
    daemon.fakejob("run", "--catch-usr1 --every 0.4 --progress heartbeat",
                   extra="restart: {backoff: {initial: 0.1s}}\n")
    daemon.start()
    pid = daemon.wait_ready("run")["pid"]
    wait_for(lambda: (daemon.status("run")["checkpoint"] or {}).get("step"), 15, "a checkpoint")
    os.kill(pid, signal.SIGKILL)
    second = daemon.wait_ready("run", starts=2)
    events = daemon.history("run")
    exit_ev = next(e for e in events if e["kind"] == "exit")
    launch = [e for e in events if e["kind"] == "launch"][1]
    resumed = second["resumed_step"]
    assert exit_ev["last_step"] >= resumed > 0
    assert launch["steps_lost"] == exit_ev["last_step"] - resumed
    # A first launch has nothing lost.
    assert "steps_lost" not in [e for e in events if e["kind"] == "launch"][0]


def test_stale_heartbeat_from_an_earlier_attempt_is_not_a_report(daemon):
    daemon.fakejob("quiet", "--catch-usr1", extra="restart: {backoff: {initial: 0.1s}}\n")
    daemon.start()
    first = daemon.wait_ready("quiet")
    pid, hb = first["pid"], Path(first["env"]["TRAINSUP_HEARTBEAT_FILE"])
    hb.write_text("123456\n")
    os.utime(hb, (1, 1))              # written long before this attempt started
    os.kill(pid, signal.SIGKILL)
    daemon.wait_ready("quiet", starts=2)
    events = daemon.history("quiet")
    assert "last_step" not in next(e for e in events if e["kind"] == "exit")
    assert all("steps_lost" not in e for e in events if e["kind"] == "launch")
