"""A `user: nobody` job shared the daemon's session and controlling terminal, and injected
a command into the root terminal the daemon was started from (TIOCSTI). Jobs get their own
session (setsid) and no controlling terminal.

Reproduced as found: the daemon's stdin/stdout/stderr are a pty (pty.openpty); the job, as
nobody, opens /dev/tty and tries TIOCSTI on it and on its stdio. The bytes must never reach
the pty master, and /proc says the job has no ctty (tty_nr 0) and leads its own session.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest
from conftest import REPO, scaled, wait_for

PY = "/usr/bin/python3"    # world-executable: the venv under /root is not nobody's

INJECT = r"""
import fcntl, json, os, sys, termios, time
out = {}
for name, opener in (("dev_tty", lambda: os.open("/dev/tty", os.O_RDWR)), ("stdin", lambda: 0),
                     ("stdout", lambda: 1)):
    try:
        fd = opener()
        for ch in b"echo PWNED\n":
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([ch]))
        out[name] = "injected"
    except OSError as e:
        out[name] = e.strerror
open(sys.argv[1], "w").write(json.dumps(out))
time.sleep(1000)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(PY, os.X_OK), reason="needs root and /usr/bin/python3")
def test_user_nobody_job_cannot_tiocsti_into_the_daemons_terminal(tmp_path):
    work = Path(tempfile.mkdtemp(prefix="trainsup-tty-"))
    os.chmod(work, 0o777)
    (work / "inject.py").write_text(INJECT)
    result = work / "result.json"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "tty.yaml").write_text(
        f"name: tty\ncommand: [{PY}, {work / 'inject.py'}, {result}]\nworkdir: {work}\nuser: nobody\n")
    sock = tmp_path / "s.sock"
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    # The daemon is a session leader whose controlling terminal is the pty, like a root shell
    # (preexec_fn: TIOCSCTTY must run in the child; the test process forks nothing else).
    d = subprocess.Popen([sys.executable, "-m", "trainsup", "--socket", str(sock), "daemon", "--jobs", str(jobs),
                          "--state", str(tmp_path / "state"), "--log-dir", str(tmp_path / "logs"), "--config", "none"],
                         stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # noqa: PLW1509
    os.close(slave)
    seen = b""
    try:
        wait_for(lambda: result.exists() and result.read_text(), 30, "the job's injection attempt")
        outcome = json.loads(result.read_text())
        assert "injected" not in outcome.values(), outcome
        from trainsup.control.client import request
        pid = request(sock, "status", "tty")["result"]["jobs"][0]["pid"]
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        assert int(fields[4]) == 0, "the job has a controlling terminal"      # tty_nr
        assert int(fields[3]) == pid and os.getsid(pid) == pid               # its own session
        # "Must not happen" over a settle window: the bytes never reach the terminal.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            r, _, _ = select.select([master], [], [], 0.05)
            if r:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert b"PWNED" not in seen
    finally:
        d.terminate()
        try:
            d.wait(scaled(30))
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()
        os.close(master)
        shutil.rmtree(work, ignore_errors=True)
