"""200 jobs at once under a file-descriptor limit: the daemon does not crash, status
answers, and a job that cannot start says why in one line.

Each job holds a few of the daemon's fds (pidfd, log pipe, log file) and a watch; the jobs
are /bin/sleep so 200 of them are cheap on a small machine.
"""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import wait_for

N = 200


def _write_jobs(daemon, n: int) -> None:
    for i in range(n):
        daemon.write_job(f"j{i:03d}", f"name: j{i:03d}\ncommand: [/bin/sleep, '3600']\nworkdir: {daemon.root}\n"
                                      f"checkpoint:\n  dir: {daemon.root / 'ck' / f'j{i:03d}'}\n"
                                      f"restart:\n  backoff: {{initial: 5s}}\nstop_timeout: 1s\n")


def _all_status(daemon) -> list:
    r = daemon.request("status", timeout=10)
    assert r["ok"], r
    return r["result"]["jobs"]


@pytest.mark.parametrize("nofile", [1024, 300])
def test_two_hundred_jobs_under_an_fd_limit(daemon, nofile):
    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is needed")
    _write_jobs(daemon, N)
    t0 = time.monotonic()
    daemon.start(prefix=["prlimit", f"--nofile={nofile}:{nofile}"])
    settled = wait_for(lambda: (jobs := _all_status(daemon)) and len(jobs) == N
                       and all(j["state"] in ("running", "backoff", "failed") for j in jobs) and jobs,
                       60, "every job to be running or to have failed to start")
    took = time.monotonic() - t0
    assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
    running = [j for j in settled if j["state"] == "running"]
    broken = [j for j in settled if j["state"] != "running"]
    for j in broken:
        assert j["error"] and "\n" not in j["error"], j
    if nofile >= 1024:
        assert not broken, [(j["name"], j["error"]) for j in broken[:5]]
    else:
        assert broken, "300 fds were enough for 200 jobs: the limit test proved nothing"
    t1 = time.monotonic()
    _all_status(daemon)
    assert time.monotonic() - t1 < 1.0
    print(f"nofile {nofile}: {len(running)} running, {len(broken)} could not start; settled in {took:.1f}s; "
          f"errors e.g. {[j['error'] for j in broken[:1]]}")
    assert daemon.terminate(timeout=60) == 0
