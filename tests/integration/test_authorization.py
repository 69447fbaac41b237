"""Authorisation and the socket's trust, with real users (issue 10).

Found: a socket_group member who owns one job preempted every user's jobs by sending
`{"cmd": "preempt", "job": "<own job>", "args": {"all": true}}`; with a world-writable socket
directory an unprivileged user replaced the socket and impersonated the daemon to root's CLI;
a regular file at the socket path gave a traceback. Users and a group are created here
(useradd/groupadd) and removed after; their CLI runs through runuser with /usr/bin/python3
(the test venv's interpreter is not theirs to run) and the source tree on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, alice_and_bob, scaled, wait_for

PY = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser")
    or not os.access(PY, os.X_OK), reason="needs root, useradd, runuser and /usr/bin/python3")


@pytest.fixture
def people():
    """Two users, alice (in the socket group) and bob (not), and the group."""
    with alice_and_bob("ts") as users:
        yield users


@pytest.fixture
def public_dir():
    """A root-owned 0755 dir that other users can reach (pytest's tmp dirs are 0700), with
    the source tree importable as `trainsup` for their CLI."""
    d = Path(tempfile.mkdtemp(prefix="trainsup-auth-"))
    d.chmod(0o755)
    (d / "src").mkdir(mode=0o755)
    (d / "src" / "trainsup").symlink_to(REPO / "supervisor")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cli_as(user: str, public: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={public / 'src'}", PY,
                           "-m", "trainsup", *args], capture_output=True, text=True, timeout=timeout, cwd="/")


def raw_as(user: str, sock: Path, request: dict) -> dict:
    client = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
              "s.sendall(sys.argv[2].encode()+b'\\n'); print(s.makefile().readline())")
    r = subprocess.run(["runuser", "-u", user, "--", PY, "-c", client, str(sock), json.dumps(request)],
                       capture_output=True, text=True, timeout=scaled(30), cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sleeper(daemon, name: str, user: str | None) -> None:
    body = f'name: {name}\ncommand: ["sleep", "3600"]\nworkdir: /\nstop_timeout: 2s\nrestart: {{policy: never}}\n'
    if user:
        body += f"user: {user}\n"
    daemon.write_job(name, body)


def _running_pids(daemon, names) -> dict:
    return {n: daemon.status(n)["pid"] for n in names if daemon.status(n)["state"] == "running"}


def test_socket_group_member_preempt_all_is_refused(people, daemon, public_dir):
    daemon.socket = public_dir / "trainsup.sock"
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"socket_group: {people['group']}\n")
    _sleeper(daemon, "alicejob", people["alice"])
    _sleeper(daemon, "bobjob", people["bob"])
    _sleeper(daemon, "rootjob", None)
    daemon.start("--config", str(config))
    names = ("alicejob", "bobjob", "rootjob")
    for n in names:
        daemon.wait_state(n, "running")
    before = _running_pids(daemon, names)

    # The way it was found: name her own job, ask for all.
    reply = raw_as(people["alice"], daemon.socket,
                   {"cmd": "preempt", "job": "alicejob", "args": {"all": True}})
    assert reply["ok"] is False, reply
    reply = raw_as(people["alice"], daemon.socket, {"cmd": "preempt", "args": {"all": True}})
    assert reply["ok"] is False and reply["error"].startswith("permission denied"), reply
    r = cli_as(people["alice"], public_dir, "--socket", str(daemon.socket), "preempt", "--all")
    assert r.returncode != 0 and "permission denied" in r.stderr, (r.stdout, r.stderr)

    # Nothing was preempted, over a settle window (a stop flow takes at least a signal).
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert _running_pids(daemon, names) == before
        time.sleep(0.1)
    assert not [e for n in names for e in daemon.history(n) if e["kind"] == "state" and e.get("to") == "preempted"]

    # What she may do, she can: her own job.
    r = cli_as(people["alice"], public_dir, "--socket", str(daemon.socket), "stop", "alicejob", "--no-save")
    assert r.returncode == 0, r.stderr
    daemon.wait_state("alicejob", "stopped")
    assert _running_pids(daemon, ("bobjob", "rootjob")) == {k: before[k] for k in ("bobjob", "rootjob")}


def _start_refused(daemon) -> str:
    daemon.start(wait=False)
    assert daemon.proc.wait(scaled(30)) == 2, daemon.log_text()
    text = daemon.log_text()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("trainsup:")]
    assert len(lines) == 1, text
    return lines[0]


def test_world_writable_socket_dir_is_refused(daemon, public_dir):
    sockdir = public_dir / "open"
    sockdir.mkdir()
    sockdir.chmod(0o777)
    daemon.socket = sockdir / "trainsup.sock"
    line = _start_refused(daemon)
    assert "writable by others" in line and str(sockdir) in line, line
    assert not daemon.socket.exists()


def test_regular_file_at_the_socket_path_is_one_line_exit_2(daemon):
    daemon.socket.write_text("not a socket\n")
    line = _start_refused(daemon)
    assert "not a socket" in line, line
    assert daemon.socket.read_text() == "not a socket\n"


def test_socket_dir_created_by_the_daemon_is_safe(people, daemon, public_dir):
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"socket_group: {people['group']}\n")
    daemon.socket = public_dir / "made" / "trainsup.sock"
    daemon.start("--config", str(config))
    st = os.stat(daemon.socket.parent)
    assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, oct(0o750))
    sst = os.stat(daemon.socket)
    assert oct(sst.st_mode & 0o777) == oct(0o660) and sst.st_gid == __import__("grp").getgrnam(people["group"]).gr_gid


_IMPOSTOR = r"""
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
open(log, "w").write("listening\n")
s.settimeout(20)
while True:
    try:
        c, _ = s.accept()
    except socket.timeout:
        break
    c.settimeout(2)
    try:
        data = c.recv(4096)
    except OSError:
        data = b""
    if data:
        open(log, "a").write("got " + repr(data) + "\n")
    try:
        c.sendall(b'{"ok": true, "result": {"daemon": {}, "jobs": []}}\n')
    except OSError:
        pass
    c.close()
"""


def _impostor(user: str, sockdir: Path, sock: Path, log: Path) -> subprocess.Popen:
    p = subprocess.Popen(["runuser", "-u", user, "--", PY, "-c", _IMPOSTOR, str(sock), str(log)], cwd="/")
    wait_for(lambda: log.exists() and "listening" in log.read_text(), 10, "the impostor to listen")
    return p


def test_socket_replaced_by_another_users_listener_is_refused_by_root_cli(people, daemon, public_dir):
    """bob replaces the socket in a world-writable dir; root's CLI must not talk to him."""
    sockdir = public_dir / "open"
    sockdir.mkdir()
    sockdir.chmod(0o777)
    log = sockdir / "impostor.log"
    sock = sockdir / "trainsup.sock"
    imp = _impostor(people["bob"], sockdir, sock, log)
    try:
        for args in (("status",), ("stop", "x")):
            r = subprocess.run([sys.executable, "-m", "trainsup", "--socket", str(sock), *args],
                               capture_output=True, text=True, timeout=scaled(30),
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
            assert r.returncode == 4, (r.stdout, r.stderr)
            assert "refusing to talk" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "got" not in log.read_text(), "root's CLI sent a request to the impostor"

        # Even when the path looks right (root-owned socket in a root-only dir), the
        # kernel's record of who listens decides.
        os.chown(sock, 0, 0)
        os.chmod(sockdir, 0o755)
        r = subprocess.run([sys.executable, "-m", "trainsup", "--socket", str(sock), "status"],
                           capture_output=True, text=True, timeout=scaled(30), env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert r.returncode == 4 and "runs as uid" in r.stderr, r.stderr
    finally:
        imp.kill()
        imp.wait()
    assert "got" not in log.read_text()


def test_client_refuses_a_regular_file_for_a_socket(tmp_path):
    from trainsup.control.client import Unreachable, request
    p = tmp_path / "trainsup.sock"
    p.write_text("")
    with pytest.raises(Unreachable, match="not a socket"):
        request(p, "status")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "ok.sock"))     # our own, in our own 0700 dir: trusted
    s.listen(1)
    s.close()


_FLOODER = r"""
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(1)
    deadline = time.monotonic() + 5
    while True:
        try:
            s.connect(sys.argv[1])
        except BlockingIOError:     # the listen backlog is full: AF_UNIX says EAGAIN at once
            if time.monotonic() < deadline:
                time.sleep(0.001)
                continue
        except OSError:
            pass
        else:
            socks.append(s)
            break
        s.close()
        break
print(len(socks), flush=True)
time.sleep(60)
"""


def test_a_socket_group_members_flood_is_capped_per_uid(people, daemon, public_dir):
    """One member's idle connections cost that member its own oldest ones; root's status
    still answers at once and the daemon holds at most MAX_PER_UID of hers."""
    from trainsup.control.server import MAX_PER_UID
    daemon.socket = public_dir / "trainsup.sock"
    config = daemon.root / "trainsup.yaml"
    config.write_text(f"socket_group: {people['group']}\n")
    daemon.start("--config", str(config))
    flood = subprocess.Popen(["runuser", "-u", people["alice"], "--", PY, "-c", _FLOODER, str(daemon.socket), "600"],
                             stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert int(flood.stdout.readline()) > MAX_PER_UID
        t0 = time.monotonic()
        assert daemon.request("status", timeout=5)["ok"]
        took = time.monotonic() - t0
        fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
        print(f"600 idle connections from one member: daemon fds {fds}, root status {took * 1000:.0f} ms")
        assert took < 1.0
        assert fds < MAX_PER_UID + 64
    finally:
        flood.kill()
        flood.wait()
