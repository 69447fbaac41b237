"""The metrics endpoint as an adversary and an operator meet it: a port already taken, a
flood of idle connections, other local users (issues 20 and 24)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import DaemonProc, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def test_metrics_port_taken_fails_the_start(tmp_path):
    """Issue 24: the daemon ran on without metrics after one ERROR line, and Prometheus
    scraped another daemon's jobs from that port. Now: exit 2, one line."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        d = DaemonProc(tmp_path / "a")
        config = d.root / "trainsup.yaml"
        config.write_text(f"metrics:\n  listen: 127.0.0.1:{port}\n")
        d.fakejob("j")
        d.start("--config", str(config), wait=False)
        assert d.proc.wait(30) == 2, d.log_text()
        errors = [line for line in d.log_text().splitlines() if "metrics" in line and "127.0.0.1" in line]
        assert len(errors) == 1 and "metrics.required: false" in errors[0], d.log_text()
        assert not d.records("j"), "a job was started by a daemon that then refused to run"

        # metrics.required: false: the daemon runs, and status says metrics are off and why.
        config.write_text(f"metrics:\n  listen: 127.0.0.1:{port}\n  required: false\n")
        d.start("--config", str(config))
        st = d.request("status")["result"]["daemon"]
        assert st["metrics"] is None and "127.0.0.1" in st["metrics_error"]
        r = d.cli("status")
        assert "running without metrics" in r.stdout, r.stdout
        d.terminate()
    finally:
        holder.close()
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is absent")
def test_metrics_idle_connections_cannot_exhaust_the_daemons_fds(daemon):
    """Issue 20: idle connections to the metrics port took a thread and an fd each, with no
    bound and no idle timeout, until `status` and `start` went unanswered. Here the daemon
    has 256 fds and 400 silent clients connect."""
    port = _free_port()
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"metrics:\n  listen: 127.0.0.1:{port}\n")
    daemon.fakejob("j", "--catch-usr1")
    daemon.start("--config", str(config), prefix=["prlimit", "--nofile=256:256", "--"])
    daemon.wait_state("j", "running")
    flood: list[socket.socket] = []
    try:
        for _ in range(400):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            flood.append(s)
        pid = daemon.proc.pid
        assert len(os.listdir(f"/proc/{pid}/fd")) < 200, "the flood took the daemon's fds"
        t0 = time.monotonic()
        assert daemon.request("status", timeout=10)["ok"]
        assert time.monotonic() - t0 < 5
        assert daemon.cli("stop", "j").returncode in (0, 1)
        assert daemon.cli("start", "j").returncode == 0
        # Silent clients are dropped: each sees EOF (or a reset) within the request deadline.
        for s in flood[:20]:
            s.settimeout(20)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        # ...and a real scrape gets through once their slots are free.
        body = wait_for(lambda: _scrape(f"http://127.0.0.1:{port}/metrics"), 30, "a scrape after the flood")
        assert 'trainsup_job_state{name="j",state="running"} 1' in body
    finally:
        for s in flood:
            s.close()


def test_metrics_on_a_unix_socket_keep_numbers_from_other_local_users(daemon, tmp_path):
    """Issue 20: a user the control socket refuses read every job's name, state and exit
    reasons from the metrics port. On a Unix socket, only the daemon's user (and the
    socket group) may connect."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    # A dir every user can traverse: only the socket's own mode may keep them out.
    base = Path(tempfile.mkdtemp(prefix="trainsup-metrics-", dir="/tmp"))
    os.chmod(base, 0o755)
    where = base / "run" / "metrics.sock"
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"metrics:\n  listen: unix:{where}\n")
    daemon.fakejob("secret-project")
    daemon.start("--config", str(config))
    assert daemon.request("status")["result"]["daemon"]["metrics"] == f"unix:{where}"
    assert oct(os.stat(where).st_mode & 0o777) == "0o600"
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); s.sendall(b'GET /metrics HTTP/1.0\\r\\n\\r\\n')\n"
             " print(s.recv(1<<20).decode(errors='replace'))\nexcept PermissionError: print('denied')\n")
    def as_nobody() -> str:
        r = subprocess.run(["/usr/bin/python3", "-c", probe, str(where)], user=65534, group=65534,
                           extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/")
        return r.stdout + r.stderr
    def as_me() -> str:
        r = subprocess.run([sys.executable, "-c", probe, str(where)], capture_output=True, text=True, timeout=30)
        return r.stdout + r.stderr
    try:
        wait_for(lambda: 'trainsup_job_state{name="secret-project",state="running"} 1' in as_me(), 15,
                 "the job in the daemon's own scrape")
        assert as_nobody().strip() == "denied"
        os.chmod(where, 0o666)            # the check itself: an open socket is readable by them
        assert 'trainsup_job_state{name="secret-project"' in as_nobody()
    finally:
        daemon.terminate()
        shutil.rmtree(base, ignore_errors=True)
