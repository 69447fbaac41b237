"""Issue 11 cases 6, 7 and 9 through a real daemon: never the last good state, never a lie
about deletion, never a spin, never a name that is not a checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_for
from trainsup.checkpoint import write_checkpoint

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chattr, capabilities)")


def _ckpts(d, job):
    r = d.request("checkpoints", job)
    assert r["ok"], r
    return {Path(c["path"]).name: c for c in r["result"]}


def _torch_save(path: Path, step: int, legacy: bool = False) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"step": step, "w": torch.arange(64)}, path, _use_new_zipfile_serialization=not legacy)


@needs_root
def test_legacy_and_unreadable_checkpoints_are_never_deleted(daemon):
    """6a: legacy torch.save files (torch.load reads them; we cannot prove them) and entries
    that could not be read (EACCES on root-squashed NFS) were deleted as "invalid" once
    older than grace + 60 s, including the only state the job could resume from. The
    daemon here runs without CAP_DAC_OVERRIDE/READ_SEARCH: root then meets EACCES exactly
    as on a root-squashed mount."""
    ck = daemon.root / "lg-ckpt"
    daemon.fakejob("lg", "--every 0.2", ckpt=False,
                   extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n")
    daemon.start(prefix=["setpriv", "--bounding-set", "-dac_override,-dac_read_search"])
    daemon.wait_ready("lg")
    old = time.time() - 2 * 86400
    for s in (1, 2):                                          # after the first launch: the job's
        _torch_save(ck / f"step_{s}.pt", s, legacy=True)
        os.utime(ck / f"step_{s}.pt", (old, old))
    squashed = ck / "step_3.pt"
    _torch_save(squashed, 3)
    os.chown(squashed, 65534, 65534)
    os.chmod(squashed, 0)
    os.utime(squashed, (old, old))
    before = {n: (ck / n).stat().st_size for n in ("step_1.pt", "step_2.pt", "step_3.pt")}
    wait_for(lambda: len([e for e in daemon.history("lg") if e["kind"] == "deleted"]) >= 3, 20,
             "rotation of the job's own trainsup checkpoints")
    listing = wait_for(lambda: (ls := _ckpts(daemon, "lg")) and all(ls[n]["kept"] for n in before) and ls,
                       10, "a pass that saw the planted files")
    for n in before:
        assert (ck / n).stat().st_size == before[n]
        assert listing[n]["kept"] == "unknown", listing[n]
    assert "unreadable" in listing["step_3.pt"]["invalid_reason"]
    assert not [e for e in daemon.history("lg") if e["kind"] == "deleted" and e["path"].endswith(".pt")]


def test_last_ckpt_written_after_clock_went_back_a_day_is_kept(daemon):
    """6b: Lightning's last.ckpt, written after the clock went back a day, is older by mtime
    than the numbered files, sorted before them and was deleted; the job then resumed from
    an older step."""
    ck = daemon.root / "pl-ckpt"
    daemon.fakejob("pl", ckpt=False, extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n"
                                          "emergency_save:\n  grace: 0s\n")   # quiet after 5 s
    daemon.start()
    daemon.wait_ready("pl")
    _torch_save(ck / "epoch=0-step=100.ckpt", 100)
    _torch_save(ck / "epoch=1-step=200.ckpt", 200)
    _torch_save(ck / "last.ckpt", 250)
    day_ago = time.time() - 86400                            # what a -1 day clock step stamps
    os.utime(ck / "last.ckpt", (day_ago, day_ago))
    daemon.request("checkpoints", "pl")
    wait_for(lambda: not (ck / "epoch=0-step=100.ckpt").exists(), 45, "rotation of the oldest numbered")
    listing = _ckpts(daemon, "pl")
    assert (ck / "last.ckpt").exists() and listing["last.ckpt"]["valid"]
    assert listing["last.ckpt"]["kept"] in ("alias", "newest")
    assert listing["epoch=1-step=200.ckpt"]["kept"] == "newest"


@needs_root
@pytest.mark.parametrize("how", ["chattr", "ro-remount"])
def test_undeletable_and_overlong_names_truthful_history_and_no_spin(daemon, how):
    """7: a 250-byte name could not go into the trash yet was recorded `deleted`; an
    undeletable entry (here `chattr +i`; read-only mounts and EBUSY alike) made the daemon
    re-plan and re-fail with no delay: 88% CPU and ~530 events/s."""
    ck = daemon.root / "tr-ckpt"
    daemon.fakejob("tr", "--every 1", ckpt=False,
                   extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n  quota: 400\n"
                         "emergency_save:\n  grace: 0s\n")
    daemon.start()
    daemon.wait_ready("tr")
    stuck = ck / "step-000000000"                             # step 0: oldest, rotated first
    long_name = "step-" + "0" * 245
    stage = daemon.root / "stage"
    write_checkpoint(stage, 0, {"w": b"x" * 100})
    shutil.copytree(stage / "step-00000000", stuck)
    os.rename(stage / "step-00000000", ck / long_name)
    if how == "chattr":
        subprocess.run(["chattr", "+i", str(stuck)], check=True)
    else:                                                     # a read-only mount, like a stale NFS export
        subprocess.run(["mount", "--bind", str(stuck), str(stuck)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(stuck)], check=True)
    try:
        wait_for(lambda: not (ck / long_name).exists(), 15, "the 250-byte entry to be deleted")
        wait_for(lambda: any(e["kind"] == "delete-failed" for e in daemon.history("tr")), 15, "the failure")
        proc = psutil.Process(daemon.proc.pid)
        proc.cpu_percent(None)
        n0 = len(daemon.history("tr", n=100000))
        t0 = time.monotonic()
        time.sleep(4.0)                                      # a settle window: must not happen
        cpu = proc.cpu_percent(None)
        hist = daemon.history("tr", n=100000)
        rate = (len(hist) - n0) / (time.monotonic() - t0)
        assert cpu < 30, f"daemon at {cpu}% CPU with a persistent deletion failure"
        assert rate < 10, f"{rate:.0f} events/s"          # the job's own saves and rotations
        mine = [e for e in hist if e.get("path", "").endswith(stuck.name)]
        assert len(mine) == len([e for e in hist[:n0] if e.get("path", "").endswith(stuck.name)]), \
            "the stuck entry kept making events"
        assert [e["kind"] for e in mine].count("delete-failed") == 1, mine      # reported once
        assert not [e for e in mine if e["kind"] == "deleted"]                   # never a lie
        assert stuck.exists()
        longs = [e["kind"] for e in sorted(hist, key=lambda e: e["at"])
                 if e.get("path", "").endswith(long_name) and e["kind"].startswith("delete")]
        assert longs == ["delete-intent", "deleted"], longs
        s = daemon.status("tr")
        assert any(w.startswith("delete-failed: step-000000000") for w in s["warnings"]), s["warnings"]
        # what cannot be deleted still counts: 340 + the newest > quota 400
        assert any(w.startswith("over-quota") for w in s["warnings"]), s["warnings"]
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(stuck)], check=False)
        else:
            subprocess.run(["umount", "-l", str(stuck)], check=False)


def test_trailing_newline_name_is_not_a_checkpoint(daemon):
    """9: `step-00000300\\n` matched `^step-(\\d{8,})$` (`$` matches before a final newline)
    and was taken as step 300: resumed from, rotated."""
    ck = daemon.root / "nl-ckpt"
    stage = daemon.root / "stage"
    write_checkpoint(stage, 300, {"state.json": b'{"step": 300}'})
    ck.mkdir()
    os.rename(stage / "step-00000300", ck / "step-00000300\n")
    daemon.fakejob("nl", "--every 0.2", ckpt=False,
                   extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n")
    daemon.start()
    start = daemon.wait_ready("nl")
    assert start["resume"] == ""
    wait_for(lambda: len([e for e in daemon.history("nl") if e["kind"] == "deleted"]) >= 2, 20, "rotations")
    listing = _ckpts(daemon, "nl")
    assert listing["step-00000300\n"]["format"] == "unmanaged"
    assert (ck / "step-00000300\n" / "state.json").read_bytes() == b'{"step": 300}'


def _deep_dir(base: Path, total: int) -> Path:
    """A real directory whose path is about `total` bytes long, made one component at a
    time through dir fds (no syscall here ever takes the whole path)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    path = base
    try:
        while len(os.fsencode(str(path))) < total - 201:
            os.mkdir("d" * 200, dir_fd=fd)
            nfd = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, path = nfd, path / ("d" * 200)
    finally:
        os.close(fd)
    return path


def test_250_byte_name_that_cannot_be_looked_up_by_path_is_not_recorded_deleted(daemon):
    """7, again: a 250-byte entry whose full path is past PATH_MAX answers ENAMETOOLONG to
    any path lookup, and a `delete-intent` a killed daemon left for it was "completed" at
    the next start (os.path.lexists says False for a name it cannot look at): recorded
    `deleted` while the entry was still there. Only ENOENT is gone."""
    from trainsup.daemon.state import StateDB
    ck = _deep_dir(daemon.root, 3900)
    write_checkpoint(ck, 1, {"w": b"x" * 100})
    long_name = "step-" + "0" * 245
    entry = write_checkpoint(daemon.root / "stage", 0, {"w": b"y" * 100})
    dst = os.open(ck, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(entry, long_name, dst_dir_fd=dst)
    finally:
        os.close(dst)
    long_path = f"{ck}/{long_name}"
    assert len(os.fsencode(long_path)) > 4096
    with pytest.raises(OSError) as e:
        os.lstat(long_path)
    assert e.value.errno == 36                                 # ENAMETOOLONG: not "gone"
    # What a daemon killed between a deletion's intent and its outcome leaves behind.
    db = StateDB(daemon.state)
    db.add_event("long", "delete-intent", {"path": long_path, "step": 0, "bytes": 100, "why": "rotation"})
    db.close()
    daemon.write_job("long", f"name: long\ncommand: [sleep, '3600']\nworkdir: /\n"
                             f"checkpoint: {{dir: {ck}, keep_last: 5}}\n")
    daemon.start()
    daemon.wait_state("long", "running")
    wait_for(lambda: any(c["path"] == long_path for c in daemon.request("checkpoints", "long")["result"]), 15,
             "the long entry indexed")
    lies = [e for e in daemon.history("long") if e["kind"] == "deleted"]
    assert not lies, lies
    dst = os.open(ck, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert long_name in os.listdir(dst)
    finally:
        os.close(dst)


def test_entry_that_cannot_be_moved_into_the_trash_is_never_already_gone(tmp_path):
    """The trash dir removed between its open and the rename (the job's user owns the
    checkpoint dir): the rename answers ENOENT, which once read as "already gone" and was
    recorded `deleted` while the entry stayed. Real dirs, real rename."""
    from trainsup.checkpoint import trash
    from trainsup.checkpoint.dirhandle import DirHandle
    long_name = "step-" + "0" * 245
    write_checkpoint(tmp_path, 0, {"w": b"x"})
    os.rename(tmp_path / "step-00000000", tmp_path / long_name)
    with DirHandle.open(tmp_path) as h:
        tfd = trash._open_trash(h)
        try:
            os.rmdir(tmp_path / trash.TRASH_DIR)                # by someone else, meanwhile
            with pytest.raises(trash.DeleteError, match="could not be moved"):
                trash._move_to_trash(h.fd, long_name, tfd, [long_name], long_name)
        finally:
            os.close(tfd)
    assert (tmp_path / long_name / "w").read_bytes() == b"x"
