"""Connections are bounded so the daemon keeps its fds and its answers (issue 10).

Found: an idle-connection flood at the default `nofile` limit (1024) exhausted the daemon's
file descriptors: `status` went unanswered and job launches failed. Two `logs -f` followers
took the request slots and `status` was refused "busy". The daemon here runs under
`prlimit --nofile=1024:1024` (soft and hard, so it cannot raise it) and is flooded with more
silent connections than it has fds.
"""

from __future__ import annotations

import json
import resource
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import scaled

FLOOD = 1500          # more than the daemon's 1024 fds


def _status_time(daemon) -> float:
    t0 = time.monotonic()
    r = daemon.request("status", timeout=5)
    took = time.monotonic() - t0
    assert r["ok"], r
    return took


def _flood(path, n: int, within: float = 20.0) -> list[socket.socket]:
    """n connections the daemon has accepted (or closed), each kept open and silent."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + scaled(within)
    while len(socks) < n and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:       # the backlog is full while the daemon catches up: try again
            s.close()
            continue
        socks.append(s)
    return socks


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit")
def test_idle_connection_flood_at_default_nofile_leaves_status_and_launches(daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOOD + 200:
        pytest.skip("this test process cannot hold the flood's sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon.fakejob("steady", "--catch-usr1", ckpt=False)
    daemon.fakejob("later", "--catch-usr1", ckpt=False, extra="autostart: false\n")
    daemon.start(prefix=["prlimit", "--nofile=1024:1024", "--"])
    daemon.wait_state("steady", "running")
    limits = open(f"/proc/{daemon.proc.pid}/limits").read()
    assert any(line.startswith("Max open files") and "1024" in line for line in limits.splitlines())
    socks = []
    try:
        socks = _flood(daemon.socket, FLOOD)
        took = max(_status_time(daemon) for _ in range(5))
        fds = len(list(Path(f"/proc/{daemon.proc.pid}/fd").iterdir()))
        print(f"flood {len(socks)} idle connections: daemon fds {fds} (limit 1024), worst status {took * 1000:.0f} ms")
        assert took < 1.0, took
        assert fds < 1024
        # A launch needs fds (pipes, a pidfd, the log): it must still work under the flood.
        r = daemon.request("start", "later")
        assert r["ok"], r
        st = daemon.wait_state("later", "running")
        assert st["pid"]
        daemon.wait_ready("later")
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Too many open files" not in daemon.log_text()
    assert daemon.proc.poll() is None


def _follow(path, job: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    s.sendall(json.dumps({"cmd": "logs", "job": job, "args": {"follow": True}}).encode() + b"\n")
    first = s.makefile("rb").readline()
    assert json.loads(first)["ok"], first
    return s


def test_two_followers_and_status(daemon):
    daemon.fakejob("chatty", "--catch-usr1", ckpt=False)
    # The smallest request pool that still serves one request at a time: followers must
    # not take from it.
    daemon.start(env={"TRAINSUP_MAX_REQUESTS": "1"})
    daemon.wait_state("chatty", "running")
    followers = [_follow(daemon.socket, "chatty") for _ in range(2)]
    try:
        took = max(_status_time(daemon) for _ in range(5))
        print(f"2 followers: worst status {took * 1000:.0f} ms")
        assert took < 1.0
    finally:
        for s in followers:
            s.close()


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit")
def test_soft_nofile_is_raised_at_start_up_to_the_hard_limit(daemon):
    daemon.start(prefix=["prlimit", "--nofile=1024:8192", "--"])
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["8192", "8192"], line
