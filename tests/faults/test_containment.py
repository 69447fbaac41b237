"""Containment regressions, reproduced the way the review found them, with real daemons.

- A job's descendant that double-forks (setsid + fork) and scrubs its environment
  (`env -i`) survived `stop`, `restart` and the daemon's own exit: the orphan sweep looked
  for TRAINSUP_JOB in environments. The job's cgroup holds it whatever it does.
- State DB deleted while a job runs, daemon SIGKILLed and restarted: the job ran twice (the
  pid lived only in the DB). The restarted daemon finds it by its cgroup.
- Daemon SIGKILLed right after a spawn, before the pid is durable: a second copy.

Processes are counted by a marker in their argv (/proc/PID/cmdline), not by environment:
the escapee has none.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from conftest import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root here")


def _marker() -> str:
    # `sleep` takes a fraction: a number no other test's process carries.
    return f"{random.randrange(10**6, 10**7)}.{random.randrange(10**5)}"


def argv_pids(*argv: str) -> list[int]:
    want = [a.encode() for a in argv]
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                got = f.read().split(b"\0")[:-1]
            with open(f"/proc/{d}/stat", "rb") as f:
                zombie = f.read().rpartition(b")")[2].split()[0] == b"Z"
        except OSError:
            continue
        if got == want and not zombie:
            out.append(int(d))
    return out


def escaping_job(daemon, name: str, marker: str) -> None:
    """The job leads `sleep MARKER` and leaves behind `sleep MARKER<attempt>`, double-forked
    into its own session with an empty environment."""
    script = (f"setsid sh -c 'env -i sleep {marker}'\"$TRAINSUP_ATTEMPT\"' &' </dev/null >/dev/null 2>&1; "
              f"exec sleep {marker}")
    daemon.write_job(name, f"name: {name}\ncommand: {json.dumps(['sh', '-c', script])}\nworkdir: {daemon.root}\n"
                           f"stop_timeout: 2s\n")


def _escapee(marker: str, attempt: int) -> int:
    (pid,) = wait_for(lambda: argv_pids("sleep", f"{marker}{attempt}"), 15, f"the escapee of attempt {attempt}")
    assert os.getsid(pid) != os.getsid(argv_pids("sleep", marker)[0])
    assert b"TRAINSUP" not in Path(f"/proc/{pid}/environ").read_bytes()
    return pid


def test_double_forking_env_scrubbing_descendant_does_not_survive_stop(daemon):
    m = _marker()
    escaping_job(daemon, "esc", m)
    daemon.start()
    daemon.wait_state("esc", "running")
    _escapee(m, 1)
    r = daemon.request("stop", "esc", no_save=True)
    assert r["ok"], r
    st = daemon.wait_state("esc", "stopped")
    # The stop flow waits for the cgroup to be empty: nothing is left when it is `stopped`.
    assert argv_pids("sleep", f"{m}1") == [] and argv_pids("sleep", m) == []
    assert st["containment"] == "cgroup v2"


def test_double_forking_env_scrubbing_descendant_does_not_survive_restart(daemon):
    m = _marker()
    escaping_job(daemon, "esc", m)
    daemon.start()
    daemon.wait_state("esc", "running")
    _escapee(m, 1)
    assert daemon.request("restart", "esc", no_save=True)["ok"]
    wait_for(lambda: daemon.status("esc")["attempt"] == 2, 15, "attempt 2")
    _escapee(m, 2)
    assert argv_pids("sleep", f"{m}1") == []


def test_double_forking_env_scrubbing_descendant_does_not_survive_daemon_exit(daemon):
    m = _marker()
    escaping_job(daemon, "esc", m)
    daemon.start()
    daemon.wait_state("esc", "running")
    _escapee(m, 1)
    assert daemon.terminate(timeout=30) == 0
    assert argv_pids("sleep", f"{m}1") == [] and argv_pids("sleep", m) == []


def _one_copy_over(marker: str, seconds: float = 1.5) -> None:
    """"Must not happen" over a settle window: never two copies of the job."""
    wait_for(lambda: argv_pids("sleep", marker), 15, "the job running")
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        n = len(argv_pids("sleep", marker))
        assert n <= 1, f"{n} copies of the job"
        time.sleep(0.05)
    assert len(argv_pids("sleep", marker)) == 1


def test_state_db_deleted_then_daemon_sigkilled_runs_one_copy(daemon):
    m = _marker()
    daemon.write_job("one", f"name: one\ncommand: [sleep, '{m}']\nworkdir: {daemon.root}\n")
    daemon.start()
    daemon.wait_state("one", "running")
    first = argv_pids("sleep", m)
    assert len(first) == 1
    for f in daemon.state.glob("*.db*"):
        f.unlink()
    daemon.kill()
    daemon.start()
    daemon.wait_state("one", "running")
    _one_copy_over(m)
    # Found again by its cgroup and shim although the state DB is gone: taken over, not
    # relaunched (one copy, the same process).
    assert argv_pids("sleep", m) == first, "the dead daemon's copy was replaced instead of taken over"
    assert daemon.status("one")["adopted"] is True


def test_daemon_sigkilled_right_after_spawn_runs_one_copy(daemon):
    """Crash point `launched`: the process exists, its pid is not yet durable."""
    m = _marker()
    daemon.write_job("one", f"name: one\ncommand: [sleep, '{m}']\nworkdir: {daemon.root}\n")
    once = daemon.root / "crashed-once"
    env = {"TRAINSUP_CRASH_AT": "launched", "TRAINSUP_CRASH_ONCE": str(once)}
    daemon.start(wait=False, env=env)
    wait_for(lambda: daemon.proc.poll() is not None, 20, "the daemon to crash right after the spawn")
    assert daemon.proc.returncode == -9 and once.exists()
    assert len(argv_pids("sleep", m)) == 1, "the launch before the crash happened"
    daemon.start(env=env)
    daemon.wait_state("one", "running")
    _one_copy_over(m)


def test_process_group_fallback_still_sweeps_setsid_descendants(daemon):
    """Where no cgroup is writable (forced here), the subreaper + process-group sweep
    remains, and status says which containment the job has."""
    m = _marker()
    script = f"setsid sh -c 'sleep {m}1 &' </dev/null >/dev/null 2>&1; exec sleep {m}"
    daemon.write_job("pg", f"name: pg\ncommand: {json.dumps(['sh', '-c', script])}\nworkdir: {daemon.root}\n"
                           "stop_timeout: 2s\n")
    daemon.start(env={"TRAINSUP_CONTAINMENT": "process-group"})
    st = daemon.wait_state("pg", "running")
    assert st["containment"] == "process-group"
    wait_for(lambda: argv_pids("sleep", f"{m}1"), 15, "the setsid descendant")
    assert daemon.request("stop", "pg", no_save=True)["ok"]
    daemon.wait_state("pg", "stopped")
    wait_for(lambda: argv_pids("sleep", f"{m}1") == [], 5, "the sweep to end the setsid descendant")
