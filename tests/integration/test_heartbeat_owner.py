"""`user:` jobs must be able to write their heartbeat file.

Regression: the daemon created state_dir/heartbeat/<job> root-owned, the `user: nobody`
job could not touch it, and hang detection restarted a healthy job. Real user, real
privilege drop (Popen user=), real files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import scaled
from trainsup.daemon.launch import process

_pw = pwd.getpwnam("nobody")
NOBODY = (_pw.pw_uid, _pw.pw_gid)      # the ids a `user: nobody` job's spec resolves to

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
PY = "/usr/bin/python3"     # world-executable: the venv under /root is not nobody's

TOUCH = "import os, sys; os.utime(sys.argv[1]); open(sys.argv[1], 'a').write('beat')"


def _as_nobody(path) -> subprocess.CompletedProcess:
    nobody = pwd.getpwnam("nobody")
    return subprocess.run([PY, "-c", TOUCH, str(path)], check=False, user=nobody.pw_uid,
                          group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=scaled(30))


@pytest.fixture
def open_dir():
    """A folder nobody can traverse (pytest's tmp_path is under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="trainsup-hb-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_user_job_heartbeat_file_writable_by_the_job(open_dir):
    hb_dir = open_dir / "state" / "heartbeat"
    hb_dir.mkdir(parents=True)
    hb = hb_dir / "job"
    before = _as_nobody(hb)
    assert before.returncode != 0, "the defect's precondition: nobody cannot create it"
    process.prepare_heartbeat(hb, NOBODY)
    st = os.lstat(hb)
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    old = os.stat(hb).st_mtime_ns
    os.utime(hb, ns=(old - 10**10, old - 10**10))
    r = _as_nobody(hb)
    assert r.returncode == 0, r.stderr
    assert os.stat(hb).st_mtime_ns > old - 10**10


def test_heartbeat_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's")
    os.chmod(victim, 0o600)
    hb = tmp_path / "heartbeat" / "job"
    hb.parent.mkdir()
    hb.symlink_to(victim)
    process.prepare_heartbeat(hb, NOBODY)
    assert not hb.is_symlink() and hb.is_file()
    assert os.stat(victim).st_uid == 0 and oct(os.stat(victim).st_mode & 0o777) == "0o600"
    assert victim.read_text() == "root's"


def test_heartbeat_existing_file_rechowned_for_a_changed_user(tmp_path):
    hb = tmp_path / "hb"
    hb.write_text("")
    process.prepare_heartbeat(hb, NOBODY)
    assert os.stat(hb).st_uid == pwd.getpwnam("nobody").pw_uid
    process.prepare_heartbeat(hb, None)       # the job's `user:` removed: stays writable by root
    assert os.stat(hb).st_uid == pwd.getpwnam("nobody").pw_uid


def test_heartbeat_hardlink_to_another_file_is_replaced(tmp_path):
    other = tmp_path / "other"
    other.write_text("x")
    hb = tmp_path / "hb"
    os.link(other, hb)
    process.prepare_heartbeat(hb, NOBODY)
    assert os.stat(other).st_uid == 0 and os.stat(hb).st_ino != os.stat(other).st_ino


BEATING = r"""
import os, sys, time
hb = os.environ["TRAINSUP_HEARTBEAT_FILE"]
while True:
    try:
        os.utime(hb)
    except OSError as e:
        print("heartbeat:", e, flush=True)
    time.sleep(0.1)
"""


def test_user_job_touching_heartbeat_is_not_restarted_by_hang_detection(daemon, open_dir):
    """The job is healthy and beats every 0.1 s; with `hang: {timeout: 1s}` the daemon
    must leave it alone (it restarted it when the beat could not land)."""
    (open_dir / "beat.py").write_text(BEATING)
    daemon.write_job("beat", f"name: beat\ncommand: [{PY}, {open_dir / 'beat.py'}]\nworkdir: {open_dir}\n"
                             "user: nobody\nhang: {timeout: 1s}\nstop_timeout: 1s\n")
    daemon.start()
    st = daemon.wait_state("beat", "running")
    hb = Path(st["heartbeat"]) if "heartbeat" in st else process.heartbeat_dir(daemon.state) / "beat"
    assert os.stat(hb).st_uid == pwd.getpwnam("nobody").pw_uid
    # "Must not happen" over three hang timeouts: no hang verdict, no second attempt.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        assert daemon.status("beat")["attempt"] == 1
        time.sleep(0.1)
    assert not [e for e in daemon.history("beat") if e["kind"] == "hang"]
    assert daemon.status("beat")["pid"] == st["pid"]


def test_heartbeat_dir_reachable_not_listable(tmp_path):
    run = tmp_path / "run"
    d = process.heartbeat_dir(tmp_path / "state", run_dir=run)
    assert d.parent == run
    for level in (run, d):
        st = os.lstat(level)
        assert st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o711"
    process.prepare_heartbeat(d / "job", NOBODY)
    process.discard_heartbeat_dir(d, run_dir=run)
    assert not d.exists()


def test_heartbeat_dir_planted_symlink_falls_back_to_the_state_dir(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.symlink_to(elsewhere)
    d = process.heartbeat_dir(tmp_path / "state", run_dir=run)
    assert d == tmp_path / "state" / "heartbeat" and d.is_dir()
    assert list(elsewhere.iterdir()) == []


def test_heartbeat_dir_keeps_an_existing_runtime_dir_mode(tmp_path):
    """/run/trainsup is systemd's RuntimeDirectory (0755, the socket's): used, not re-moded."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    d = process.heartbeat_dir(tmp_path / "state", run_dir=run)
    assert d.parent == run and oct(os.stat(run).st_mode & 0o777) == "0o755"
    os.chmod(run, 0o750)                      # not searchable by job users: the fallback
    assert process.heartbeat_dir(tmp_path / "state2", run_dir=run) == tmp_path / "state2" / "heartbeat"
