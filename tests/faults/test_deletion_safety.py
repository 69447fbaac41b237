"""Issue 11: deletion cannot reach another user's files, across a mount, or lie about it.

Real accounts (useradd), real bind mounts and remounts, real files: these need root, which
the project's test machines have; they skip elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from trainsup.checkpoint import dirhandle, write_checkpoint
from trainsup.checkpoint.dirhandle import CheckpointDirError, DirHandle
from trainsup.checkpoint.trash import TRASH_DIR, DeleteError, delete_entry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="accounts and mounts need root")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["openat2", "per-component"])
def resolver(request, monkeypatch):
    """Every test runs with openat2 and with the O_NOFOLLOW-per-component fallback."""
    if request.param == "openat2" and not dirhandle.HAVE_OPENAT2:
        pytest.skip("kernel has no openat2")
    monkeypatch.setattr(dirhandle, "use_openat2", request.param == "openat2")
    return request.param


@pytest.fixture
def open_base():
    """A dir other accounts can traverse (pytest's tmp_path sits under a 0700 dir)."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="trainsup-del-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def accounts():
    names = [f"tsu{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for n in names:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", n], check=True)
    yield [(n, int(subprocess.check_output(["id", "-u", n])), int(subprocess.check_output(["id", "-g", n])))
           for n in names]
    for n in names:
        subprocess.run(["userdel", n], check=False)


def as_user(uid: int, gid: int, *cmd: str) -> None:
    subprocess.run(list(cmd), check=True, user=uid, group=gid, extra_groups=[])


@needs_root
def test_symlinked_parent_swap_never_reaches_other_account(open_base, accounts, resolver):
    """Case 1: u1 replaces `run` (a component above its checkpoint dir) with a symlink to
    u2's run dir after the job's dir was resolved; the daemon must neither index nor delete
    u2's checkpoints, and must flag the job instead."""
    (u1, uid1, gid1), (u2, uid2, gid2) = accounts
    home1, home2 = open_base / u1, open_base / u2
    for home, uid, gid in ((home1, uid1, gid1), (home2, uid2, gid2)):
        (home / "run" / "ckpt").mkdir(parents=True)
        for d in (home, home / "run", home / "run" / "ckpt"):
            os.chown(d, uid, gid)
    for s in (1, 2, 3):
        write_checkpoint(home2 / "run" / "ckpt", s, {"w": f"u2-step-{s}".encode()})
    canary = snapshot(home2)
    write_checkpoint(home1 / "run" / "ckpt", 1, {"w": b"u1"})

    h = DirHandle.open(home1 / "run" / "ckpt")          # at config load
    try:
        as_user(uid1, gid1, "sh", "-c", f"mv {home1}/run {home1}/run.old && ln -s {home2}/run {home1}/run")
        assert h.check() is not None and "replaced" in h.check()
        # the held fd still names u1's own dir: what a scan through it sees is u1's
        assert sorted(os.listdir(h.io_root)) == [".trainsup-tmp", "step-00000001"]
        for name in ("step-00000001", "step-00000002", "step-00000003"):
            try:
                delete_entry(h, name)                       # only ever u1's held dir
            except FileNotFoundError:
                pass
        with pytest.raises(DeleteError, match="symlink"):
            delete_entry(home1 / "run" / "ckpt", "step-00000002")   # by path: refused
        with pytest.raises(CheckpointDirError, match=f"{home1}/run: is a symlink"):
            DirHandle.open(home1 / "run" / "ckpt")          # a re-resolve refuses too
    finally:
        h.close()
    assert snapshot(home2) == canary


@pytest.fixture
def bind_mount(tmp_path):
    mounted = []

    def mount(src: Path, dst: Path) -> None:
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        mounted.append(dst)
    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


@needs_root
def test_bind_mount_inside_old_checkpoint_is_never_emptied(tmp_path, bind_mount, resolver):
    """Case 2: a dataset bind-mounted inside an old checkpoint (same filesystem, so same
    st_dev) made the recursive delete empty it."""
    ck, data = tmp_path / "ck", tmp_path / "dataset"
    (data / "shard").mkdir(parents=True)
    (data / "shard" / "000.bin").write_bytes(b"dataset-canary" * 100)
    canary = snapshot(data)
    old = write_checkpoint(ck, 1, {"w": b"1"})
    (old / "cache").mkdir()
    bind_mount(data, old / "cache")
    (old / "deep" / "er").mkdir(parents=True)
    with DirHandle.open(ck) as h:
        with pytest.raises(DeleteError, match="mount point"):
            delete_entry(h, "step-00000001")
    assert snapshot(data) == canary
    assert (old / "w").read_bytes() == b"1"             # refused whole: nothing of it touched
    subprocess.run(["umount", str(old / "cache")], check=True)
    delete_entry(ck, "step-00000001")                    # once unmounted it goes normally
    assert not old.exists() and snapshot(data) == canary


@needs_root
def test_entry_that_is_itself_a_mount_point_is_refused(tmp_path, bind_mount, resolver):
    ck, data = tmp_path / "ck", tmp_path / "data"
    data.mkdir()
    (data / "keep").write_bytes(b"x")
    write_checkpoint(ck, 1, {"w": b"1"})
    (ck / "step-00000002").mkdir()
    bind_mount(data, ck / "step-00000002")
    with pytest.raises(DeleteError, match="mount point"):
        delete_entry(ck, "step-00000002")
    assert (data / "keep").read_bytes() == b"x"


def test_250_byte_name_is_deleted_for_real(tmp_path, resolver):
    """Case 7: a 250-byte name could not be moved into the trash (ENAMETOOLONG: the trash
    name added a suffix) and was reported deleted anyway."""
    name = "step-" + "0" * 245
    assert len(name) == 250
    write_checkpoint(tmp_path, 1, {"w": b"1"})
    (tmp_path / name).mkdir()
    (tmp_path / name / "f").write_bytes(b"x")
    delete_entry(tmp_path, name)
    assert not (tmp_path / name).exists()
    assert os.listdir(tmp_path / TRASH_DIR) == []


@needs_root
def test_read_only_remount_fails_cleanly(tmp_path, bind_mount, resolver):
    """Case 7: a read-only mount makes every deletion fail: one clear error, entry intact."""
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w": b"1"})
    bind_mount(ck, ck)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ck)], check=True)
    with pytest.raises(DeleteError, match="Read-only file system"):
        delete_entry(ck, "step-00000001")
    assert (ck / "step-00000001" / "w").read_bytes() == b"1"


@needs_root
def test_missing_dir_is_created_owned_by_the_job_user(open_base, accounts, resolver):
    """Issue 10: a `user:` job's checkpoint dir was created root-owned: it could not save."""
    (u1, uid1, gid1), _ = accounts
    tmp_path = open_base
    home = tmp_path / u1
    home.mkdir()
    os.chown(home, uid1, gid1)
    with DirHandle.open(home / "run" / "ckpt", create_as=(uid1, gid1)) as h:
        st = os.fstat(h.fd)
        assert (st.st_uid, st.st_gid) == (uid1, gid1)
    assert os.stat(home / "run").st_uid == uid1
    as_user(uid1, gid1, "sh", "-c", f"echo saved > {home}/run/ckpt/model.pt")
    # a symlink planted where the dir should be is never followed to create it elsewhere
    shutil.rmtree(home / "run")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", home / "run")
    with pytest.raises(CheckpointDirError, match="symlink"):
        DirHandle.open(home / "run" / "ckpt", create_as=(uid1, gid1))
    assert os.listdir(tmp_path / "elsewhere") == []


USER_JOB = r"""
import os, sys, time, zipfile
d = sys.argv[1]
n = 0
while True:
    n += 1
    try:
        tmp = os.path.join(d, ".w.tmp")
        with zipfile.ZipFile(tmp, "w") as z:
            z.writestr("archive/data.pkl", b"u1 state %d" % n)
        os.rename(tmp, os.path.join(d, "step_%d.pt" % n))
    except OSError:
        pass
    time.sleep(0.2)
"""


@needs_root
def test_root_daemon_user_job_parent_swapped_for_symlink_to_other_account(daemon, open_base, accounts):
    """Case 1 through a root daemon: job `user: u1`, checkpoint.dir /<base>/u1/run/ckpt; u1
    replaces `run` with a symlink to u2's run dir. The daemon indexed u2's checkpoints as
    the job's, deleted u2's older ones (as u2) and offered u2's newest for resume. Also
    issue 10: the missing checkpoint dir was created root-owned, so the job could not save."""
    import zipfile

    from conftest import wait_for
    (u1, uid1, gid1), (u2, uid2, gid2) = accounts
    home1, home2 = open_base / u1, open_base / u2
    for home, uid, gid in ((home1, uid1, gid1), (home2, uid2, gid2)):
        home.mkdir()
        os.chown(home, uid, gid)
    (home2 / "run" / "ckpt").mkdir(parents=True)
    for s in (1, 2, 3):
        with zipfile.ZipFile(home2 / "run" / "ckpt" / f"step_{s}.pt", "w") as z:
            z.writestr("archive/data.pkl", f"u2 state {s}".encode())
    for p in (home2 / "run", *sorted((home2 / "run").rglob("*"))):
        os.chown(p, uid2, gid2)
    canary = snapshot(home2)
    ck = home1 / "run" / "ckpt"
    script = open_base / "userjob.py"
    script.write_text(USER_JOB)
    daemon.write_job("u1job", f"name: u1job\ncommand: [/usr/bin/python3, {script}, {ck}]\nworkdir: {home1}\n"
                              f"user: {u1}\ncheckpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n"
                              "emergency_save:\n  grace: 0s\n")
    daemon.start(env={"TRAINSUP_RESCAN_INTERVAL": "0.3"})
    wait_for(lambda: len([e for e in daemon.history("u1job") if e["kind"] == "deleted"]) >= 2, 30,
             "rotation of u1's own checkpoints (u1 could save: the dir it was given is its own)")
    assert os.stat(ck).st_uid == uid1 and os.stat(home1 / "run").st_uid == uid1
    as_user(uid1, gid1, "sh", "-c", f"mv {home1}/run {home1}/run.old && ln -s {home2}/run {home1}/run")
    wait_for(lambda: any("rotation paused" in w for w in daemon.status("u1job")["warnings"]), 20,
             "the job flagged: its checkpoint dir was replaced")
    n_deleted = len([e for e in daemon.history("u1job") if e["kind"] == "deleted"])
    assert daemon.request("restart", "u1job")["ok"]
    launch = wait_for(lambda: [e for e in daemon.history("u1job") if e["kind"] == "launch"][1:], 20,
                      "the relaunch")[-1]
    assert not (launch.get("resume_from") or "").startswith(str(home1 / "run")), launch
    time.sleep(3)                                         # settle: rescans and passes run meanwhile
    assert snapshot(home2) == canary
    assert len([e for e in daemon.history("u1job") if e["kind"] == "deleted"]) == n_deleted


STOPPER = r"""
import os, signal, sys, time
open(sys.argv[1], "w").write("stopping")
while True:
    try:
        os.kill(-1, signal.SIGSTOP)   # every process this user may signal (not itself)
    except OSError:
        pass
    time.sleep(0.01)
"""


@needs_root
def test_job_user_sigstopping_everything_cannot_freeze_deletion(daemon, open_base, accounts):
    """Issue 10: the deleter ran as the checkpoint dir's owner, so that user's job could
    SIGSTOP it: rotation froze for every job and the daemon then ignored SIGTERM."""
    import zipfile

    from conftest import wait_for
    (u1, uid1, gid1), _ = accounts
    home = open_base / u1
    home.mkdir()
    os.chown(home, uid1, gid1)
    ck = home / "ckpt"
    flag = home / "stopping"
    script = open_base / "stopper.py"
    script.write_text(STOPPER)
    daemon.write_job("stopper", f"name: stopper\ncommand: [/usr/bin/python3, {script}, {flag}]\nworkdir: {home}\n"
                                f"user: {u1}\ncheckpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n"
                                "emergency_save:\n  grace: 0s\n")
    daemon.start(env={"TRAINSUP_RESCAN_INTERVAL": "0.3"})
    wait_for(lambda: flag.exists(), 20, "the job to start SIGSTOPping")
    for s in range(1, 6):                    # u1's checkpoints, landing while the stopper runs
        with zipfile.ZipFile(ck / f".t{s}", "w") as z:
            z.writestr("archive/data.pkl", b"state %d" % s)
        os.chown(ck / f".t{s}", uid1, gid1)
        os.rename(ck / f".t{s}", ck / f"step_{s}.pt")
    wait_for(lambda: sorted(p.name for p in ck.iterdir() if p.name.endswith(".pt")) == ["step_5.pt"], 20,
             "rotation to go on under the stopper")
    assert [e["kind"] for e in daemon.history("stopper")].count("deleted") == 4
    t = time.monotonic()
    daemon.terminate(timeout=30)                       # SIGTERM still ends the daemon
    assert time.monotonic() - t < 30


@needs_root
def test_daemon_rotation_never_empties_a_dataset_mounted_in_an_old_checkpoint(daemon, bind_mount):
    """Case 2 through the daemon: a container setup bind-mounted a dataset inside an old
    checkpoint; rotation emptied it. Now the entry is refused (reported once) and the
    dataset is untouched, while the rest of rotation goes on."""
    from conftest import wait_for
    data = daemon.root / "dataset"
    (data / "shard").mkdir(parents=True)
    (data / "shard" / "000.bin").write_bytes(b"dataset-canary" * 1000)
    canary = snapshot(data)
    ck = daemon.root / "bm-ckpt"
    daemon.fakejob("bm", "--every 0.3", ckpt=False,
                   extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n"
                         "emergency_save:\n  grace: 0s\n")
    daemon.start()
    daemon.wait_ready("bm")
    stage = daemon.root / "stage"
    write_checkpoint(stage, 0, {"w": b"old"})
    (stage / "step-00000000" / "cache").mkdir()
    os.rename(stage / "step-00000000", ck / "step-00000000")
    bind_mount(data, ck / "step-00000000" / "cache")
    wait_for(lambda: any(e["kind"] == "delete-failed" and e["path"].endswith("step-00000000")
                         for e in daemon.history("bm")), 30, "the refusal")
    wait_for(lambda: len([e for e in daemon.history("bm") if e["kind"] == "deleted"]) >= 3, 20,
             "rotation of the job's other checkpoints")
    assert snapshot(data) == canary
    assert (ck / "step-00000000" / "w").read_bytes() == b"old"
    fail = [e for e in daemon.history("bm") if e["kind"] == "delete-failed"]
    assert len(fail) == 1 and "mount point" in fail[0]["error"], fail
    assert any("mount point" in w for w in daemon.status("bm")["warnings"])


def test_held_dir_deleted_and_recreated_is_followed_moved_away_is_flagged(tmp_path):
    """A held dir removed outright (nothing left of it) is re-resolved to the new real dir;
    one moved away (still alive elsewhere) flags the job: nothing deleted, nothing offered."""
    from trainsup.checkpoint.custody import JobCheckpointDir
    from trainsup.spec import CheckpointSpec
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w": b"1"})
    jd = JobCheckpointDir("j", CheckpointSpec(dir=ck, keep_last=1, keep_best=0), 0.0, None)
    jd.open()
    shutil.rmtree(ck)
    write_checkpoint(ck, 7, {"w": b"7"})
    infos, flag = jd.scan(None)
    assert flag is None and [i.name for i in infos if i.managed] == ["step-00000007"]
    os.rename(ck, tmp_path / "moved")
    write_checkpoint(ck, 9, {"w": b"9"})
    infos, flag = jd.scan(None)
    assert flag and "replaced" in flag
    assert jd.plan(infos).delete == []
    jd.close()
