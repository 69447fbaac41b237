"""Privilege boundaries of issue 20, with real users, a real root daemon and real files.

Found: a member's job file without `user:` in a team's group-writable jobs dir ran as root
(nothing checked who wrote a job file or its dir); `.trainsup-aside/` (and the trash) was
made by root, mode 0700, inside a `user:` job's own checkpoint dir, so the user could no
longer read, recover or delete what was moved there; a planted symlink under either name
ended the job `failed` with an internal error; a `user:` job could not read its notice
file (it sat in the state dir, 0750 root), so one save per preemption and `time_left()`
silently did not exist for it: it saved, went on, got SIGTERM and saved again.
Users and a group are made with useradd/groupadd and removed after; their commands run
through runuser with /usr/bin/python3 and the source tree on PYTHONPATH.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, alice_and_bob, wait_for

PY = "/usr/bin/python3"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser")
    or not os.access(PY, os.X_OK), reason="needs root, useradd, runuser and /usr/bin/python3")


@pytest.fixture
def team():
    """alice (in group team) and bob (not), and the group."""
    with alice_and_bob("tp") as users:
        yield users


@pytest.fixture
def public_dir():
    """Root-owned 0755 (pytest's tmp dirs are 0700), with the source tree importable as
    `trainsup` for the other users' programs."""
    d = Path(tempfile.mkdtemp(prefix="trainsup-priv-"))
    d.chmod(0o755)
    (d / "src").mkdir(mode=0o755)
    (d / "src" / "trainsup").symlink_to(REPO / "supervisor")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_user(user: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *argv], input=stdin, capture_output=True,
                          text=True, timeout=30, cwd="/")


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def sleeper(name: str, user: str | None = None) -> str:
    body = f'name: {name}\ncommand: ["sleep", "3600"]\nworkdir: /\nstop_timeout: 2s\nrestart: {{policy: never}}\n'
    return body + (f"user: {user}\n" if user else "")


def one_error(daemon, name: str) -> str:
    st = daemon.status(name)
    assert st["state"] == "invalid", st
    assert "\n" not in st["error"], st["error"]
    return st["error"]


# -------------------------------------------------------------------- job files


def test_team_drop_box_member_job_without_user_does_not_run_as_root(team, daemon, public_dir):
    """The way it was found: a group-writable (setgid) jobs dir a team shares; a member
    drops a job file with no `user:`. It must not run as root: invalid, one line."""
    jobs = public_dir / "jobs.d"
    jobs.mkdir()
    os.chown(jobs, 0, grp.getgrnam(team["group"]).gr_gid)
    jobs.chmod(0o2775)
    daemon.jobs = jobs
    alice, bob = team["alice"], team["bob"]
    for fname, body in (("asroot", sleeper("asroot")), ("mine", sleeper("mine", alice)),
                        ("asbob", sleeper("asbob", bob))):
        r = as_user(alice, "sh", "-c", f"umask 022; cat > {jobs / (fname + '.yaml')}", stdin=body)
        assert r.returncode == 0, r.stderr
    (jobs / "rootfile.yaml").write_text(sleeper("rootfile"))        # root's own file, same dir
    daemon.start()

    err = one_error(daemon, "asroot")
    assert f"owned by uid {uid_of(alice)} ({alice})" in err and "no `user:`" in err, err
    assert err.startswith(str(jobs / "asroot.yaml") + ":1: "), err
    err = one_error(daemon, "asbob")
    assert f"`user: {bob}`" in err and "runs only as its owner" in err, err
    # root's file in a dir others can write: someone else may have put it there
    err = one_error(daemon, "rootfile")
    assert "writable by group" in err and str(jobs) in err, err
    # her own file naming herself runs, as her
    st = daemon.wait_state("mine", "running")
    assert proc_uid(st["pid"]) == uid_of(alice)
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p) == ["sleep", "3600"]
                and proc_uid(int(p.name)) == 0 and _env_job(p) in ("asroot", "asbob", "rootfile")]

    # The dir made safe again (root's, 0755): root's file runs; alice's without `user:` still not.
    jobs.chmod(0o755)
    assert daemon.request("reload")["ok"]
    daemon.wait_state("rootfile", "running")
    assert "no `user:`" in one_error(daemon, "asroot")


def test_job_file_writable_by_others_is_invalid(daemon):
    daemon.write_job("open", sleeper("open")).chmod(0o666)
    daemon.start()
    err = one_error(daemon, "open")
    assert "writable by others" in err and "chmod go-w" in err, err


def _cmdline(p: Path) -> list[str]:
    try:
        return p.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _env_job(p: Path) -> str | None:
    try:
        for kv in p.joinpath("environ").read_bytes().split(b"\0"):
            if kv.startswith(b"TRAINSUP_JOB="):
                return kv.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


# -------------------------------------------------- aside and trash of a user: job

def _torch_zip(step: int) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", json.dumps({"step": step}).encode())
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _put(path: Path, data: bytes, owner: str) -> None:
    path.write_bytes(data)
    pw = pwd.getpwnam(owner)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def test_aside_and_trash_of_a_user_job_belong_to_its_user(team, daemon, public_dir):
    alice = team["alice"]
    ck = public_dir / "ck"
    daemon.write_job("mine", f"name: mine\ncommand: [sleep, '3600']\nworkdir: /\nuser: {alice}\n"
                             f"checkpoint: {{dir: {ck}, keep_last: 1, keep_best: 0}}\n"
                             "restart: {backoff: {initial: 0s}}\nemergency_save: {grace: 0s}\n")
    daemon.start()
    st = daemon.wait_state("mine", "running")
    assert os.stat(ck).st_uid == uid_of(alice)
    _put(ck / "step_1.pt", _torch_zip(1), alice)
    _put(ck / "step_2.pt", _torch_zip(2), alice)
    _put(ck / "step_3.pt", b"PK\x03\x04 cut short by a kill", alice)     # an interrupted save
    wait_for(lambda: not (ck / "step_1.pt").exists(), 20, "rotation to delete step_1.pt")
    os.kill(st["pid"], 9)                                                # the job dies; relaunched
    wait_for(lambda: (ck / ".trainsup-aside").is_dir() and any((ck / ".trainsup-aside").iterdir()), 20,
             "the interrupted save moved aside")
    daemon.wait_state("mine", "running")
    for d in (ck / ".trainsup-aside", ck / ".trainsup-trash"):
        s = os.stat(d)
        assert (s.st_uid, s.st_gid) == (uid_of(alice), pwd.getpwnam(alice).pw_gid), (d, s)
    # what a user does with a save moved aside: look, read it back, delete it
    r = as_user(alice, "ls", str(ck / ".trainsup-aside"))
    assert r.returncode == 0 and "step_3.pt" in r.stdout, r
    r = as_user(alice, "cp", str(ck / ".trainsup-aside" / "step_3.pt"), str(ck / "recovered.pt"))
    assert r.returncode == 0, r.stderr
    r = as_user(alice, "rm", "-r", str(ck / ".trainsup-aside"), str(ck / ".trainsup-trash"))
    assert r.returncode == 0, r.stderr


def test_planted_aside_and_trash_symlinks_are_a_warning_and_the_launch_goes_on(daemon, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"not the daemon's")
    (ck / ".trainsup-aside").symlink_to(elsewhere)
    (ck / ".trainsup-trash").symlink_to(elsewhere)
    daemon.write_job("planted", f"name: planted\ncommand: [sleep, '3600']\nworkdir: /\n"
                                f"checkpoint: {{dir: {ck}, keep_last: 1, keep_best: 0}}\n"
                                "restart: {backoff: {initial: 0s}}\nemergency_save: {grace: 0s}\n")
    daemon.start()
    st = daemon.wait_state("planted", "running")
    (ck / "step_1.pt").write_bytes(_torch_zip(1))
    (ck / "step_2.pt").write_bytes(_torch_zip(2))
    (ck / "step_3.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    wait_for(lambda: any("symlink" in w and ".trainsup-trash" in w for w in daemon.status("planted")["warnings"]),
             20, "the planted trash in status")
    os.kill(st["pid"], 9)
    wait_for(lambda: (s := daemon.status("planted"))["state"] == "running" and s["pid"] != st["pid"], 20,
             "the relaunch (not `failed`)")
    s = daemon.status("planted")
    assert not s.get("error"), s["error"]
    assert any("symlink" in w and ".trainsup-aside" in w for w in s["warnings"]), s["warnings"]
    assert not [e for e in daemon.history("planted") if e["kind"] == "internal-error"]
    assert sorted(os.listdir(elsewhere)) == ["keep"] and (elsewhere / "keep").read_bytes() == b"not the daemon's"
    assert (ck / ".trainsup-aside").is_symlink() and (ck / ".trainsup-trash").is_symlink()
    assert (ck / "step_3.pt").exists() and (ck / "step_1.pt").exists()     # nothing moved, nothing deleted


# ------------------------------------------------------- notices of a user: job

_PLAIN_JOB = r"""
import io, json, os, sys, time, zipfile
import trainsup.emergency as em

rec = sys.argv[1]
ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]

def record(**kw):
    with open(rec, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "t": time.time(), **kw}) + "\n")

def torch_zip(step):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", json.dumps({"step": step}).encode())
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()

em.save_requested()                      # installs the handlers
record(event="start", notice=os.environ.get("TRAINSUP_NOTICE_FILE"))
step = 0
while True:
    step += 1
    time.sleep(0.02)
    if em.save_requested():
        req = em.current()
        path = os.path.join(ck, f"step_{step}.pt")
        data = torch_zip(step)
        em.atomic_write(path, lambda f: f.write(data))
        record(event="saved", kind=req.kind, time_left=req.time_left(), step=step)
        em.served(req, path, exit=True)
"""


def test_user_job_reads_its_notice_and_saves_once_per_preemption(team, daemon, public_dir):
    """The plain trainsup.emergency path in a `user:` job: a preempt notice it can read is
    one save, then exit 0 by itself; with the notice out of reach it saved as for a
    checkpoint, went on, got SIGTERM and saved again (exit 143)."""
    alice = team["alice"]
    run = public_dir / "run"
    run.mkdir()
    os.chown(run, uid_of(alice), pwd.getpwnam(alice).pw_gid)
    (public_dir / "job.py").write_text(_PLAIN_JOB)
    rec = run / "rec"
    daemon.write_job("plain", f"name: plain\ncommand: [{PY}, {public_dir / 'job.py'}, {rec}]\nworkdir: {run}\n"
                              f"user: {alice}\nenv: {{PYTHONPATH: {public_dir / 'src'}}}\n"
                              f"checkpoint: {{dir: {public_dir / 'ck'}}}\nemergency_save: {{grace: 20s}}\n"
                              "stop_timeout: 10s\n")
    daemon.start()
    daemon.wait_state("plain", "running")
    start = wait_for(lambda: [r for r in _records(rec) if r["event"] == "start"], 20, "the job's start")[0]
    notice = Path(start["notice"])
    r = as_user(alice, "test", "-r", str(notice.parent), "-a", "-w", str(notice.parent))
    assert r.returncode == 0, f"{notice.parent} is out of the job user's reach"
    assert str(daemon.state) not in str(notice)
    out = daemon.request("preempt", "plain", timeout=60)
    assert out["ok"], out
    res = out["result"]
    assert res["outcome"] == "saved" and not res.get("killed"), res
    daemon.wait_state("plain", "preempted")
    saves = [r for r in _records(rec) if r["event"] == "saved"]
    assert len(saves) == 1, saves
    assert saves[0]["kind"] == "preempt" and saves[0]["time_left"] is not None and saves[0]["time_left"] > 0, saves
    # exit 0 by itself: a SIGTERM would have been a second request (a save and exit 143)
    exits = [e for e in daemon.history("plain") if e["kind"] == "exit"]
    assert exits and exits[-1]["reason"] == "exit 0", exits
    s = os.stat(notice.parent)
    assert (s.st_uid, s.st_mode & 0o777) == (uid_of(alice), 0o700)
    r = as_user(team["bob"], "cat", str(notice))
    assert r.returncode != 0, "another user read the job's notice"


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
