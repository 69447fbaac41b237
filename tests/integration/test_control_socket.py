"""The control socket under hostile callers: other users, garbage, huge lines."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import scaled


def _raw(sock_path, payload: bytes, read=True, timeout=5.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(scaled(timeout))
    s.connect(str(sock_path))
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    out = b""
    if read:
        try:
            while not out.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    s.close()
    return out


def test_socket_mode_is_0660_and_not_abstract(daemon):
    daemon.start()
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser") or not os.path.exists("/usr/bin/python3"), reason="needs root and runuser")
def test_other_uid_is_refused_even_with_chmod_666(daemon, tmp_path):
    import tempfile
    sockdir = Path(tempfile.mkdtemp(prefix="trainsup-test-"))
    sockdir.chmod(0o755)              # reachable by nobody; the socket's own mode is what matters
    daemon.socket = sockdir / "trainsup.sock"
    daemon.fakejob("victim", "--catch-usr1", ckpt=False)
    daemon.start()
    daemon.wait_state("victim", "running")
    daemon.wait_ready("victim")
    os.chmod(daemon.socket, 0o666)
    client = ("import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
              "s.sendall(json.dumps({'cmd':'stop','job':'victim'}).encode()+b'\\n'); print(s.recv(4096).decode())")
    r = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", client, str(daemon.socket)],
                       capture_output=True, text=True, timeout=scaled(30))
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["ok"] is False
    assert reply["error"].startswith("permission denied:")
    assert daemon.status("victim")["state"] == "running"


def test_garbage_and_huge_lines_do_not_hurt_the_daemon(daemon):
    daemon.fakejob("steady", "--catch-usr1", ckpt=False)
    daemon.start()
    daemon.wait_state("steady", "running")
    daemon.wait_ready("steady")
    for payload in (b"\x00\xff garbage\n", b"[1,2,3]\n", b'{"cmd": 5}\n', b'{"cmd": "rm -rf"}\n',
                    b'{"cmd": "status", "job": ["x"]}\n', b"{" * 100000 + b"\n"):
        reply = json.loads(_raw(daemon.socket, payload))
        assert reply["ok"] is False and reply["error"], reply
    huge = b'{"cmd": "status", "pad": "' + b"x" * (10 << 20) + b'"}\n'
    reply = _raw(daemon.socket, huge)
    assert b"too large" in reply or reply == b""
    # A client that connects and says nothing, and one that vanishes mid-request.
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(str(daemon.socket))
    _raw(daemon.socket, b'{"cmd": "sta', read=False)
    assert daemon.status("steady")["state"] == "running"
    idle.close()
    assert daemon.proc.poll() is None


def test_cli_status_exit_codes(daemon):
    r = daemon.cli("status")
    assert r.returncode == 4 and "no trainsup daemon" in r.stderr
    daemon.fakejob("fine", "--catch-usr1", ckpt=False)
    daemon.start()
    daemon.wait_state("fine", "running")
    r = daemon.cli("status")
    assert r.returncode == 0, r
    header = r.stdout.splitlines()[0].split()
    assert header == ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "GOODPUT", "CHECKPOINT", "DISK/QUOTA", "MEMORY"]
    assert r.stdout.splitlines()[1].split()[:2] == ["fine", "running"]
    r = daemon.cli("status", "nosuch")
    assert r.returncode == 4
    r = daemon.cli("status", "--json")
    data = json.loads(r.stdout)
    assert set(data["daemon"]) >= {"pid", "version", "uptime_s"}
    job = data["jobs"][0]
    assert set(job) >= {"name", "state", "pid", "attempt", "restarts", "last_exit", "checkpoint", "memory", "error"}
    r = daemon.cli("stop", "nosuch")
    assert r.returncode == 4 and r.stderr.strip() == "trainsup: no such job: nosuch"
    r = daemon.cli("frobnicate")
    assert r.returncode == 2
