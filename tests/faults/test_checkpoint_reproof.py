"""Issue 11 case 8: a checkpoint edited in place through a shared mmap (ctime unchanged)
was still offered for resume from its cached verdict. Real tmpfs and a real ext4 (loop)
mount; needs root."""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for
from trainsup.checkpoint import MemoryVerdictCache, write_checkpoint
from trainsup.checkpoint.dirhandle import DirHandle
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.reprove import change_cookie_available, latest_for_launch

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture(params=["tmpfs", "ext4"])
def fs(request, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(mnt)], check=True)
    else:
        img = tmp_path / "fs.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"no loop mount here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def shared_map(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def test_shared_mmap_edit_is_caught_before_launch(fs):
    ck = fs / "ck"
    write_checkpoint(ck, 1, {"w.bin": b"\1" * (1 << 20)})
    write_checkpoint(ck, 2, {"w.bin": b"\2" * (1 << 20)})
    # a trainer keeps the file mapped; its first write faults and moves ctime ...
    m = shared_map(ck / "step-00000002" / "w.bin")
    try:
        m[10:11] = b"\2"                       # same byte: content still matches the manifest
        cache = MemoryVerdictCache()
        with DirHandle.open(ck) as h:
            infos = [i for i in scan(h, cache=cache) if i.managed]
            assert [i.valid for i in infos] == [True, True]
            # ... later writes to the same, already writable page do not (tmpfs: never
            # written back; ext4: until writeback write-protects the page again)
            m[20:21] = b"\xff"
            chosen = latest_for_launch(h.io_root, infos, cache)
            assert chosen is not None and chosen.name == "step-00000001", "the damaged checkpoint was offered"
    finally:
        m.close()


def test_change_cookie_is_not_for_userspace(fs):
    """The measurement behind the choice in reprove.py: statx gives no change cookie."""
    p = fs / "f"
    p.write_bytes(b"x")
    assert change_cookie_available(str(p)) is False


def test_daemon_never_hands_a_mmap_damaged_checkpoint_to_a_launch(daemon):
    """Case 8 through the daemon: the launch after the damage resumes from the older,
    intact checkpoint (the index's cached verdict still said valid)."""
    ck = daemon.root / "mm-ckpt"
    ck.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(ck)], check=True)
    try:
        daemon.fakejob("mm", ckpt=False, extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 5\n")
        daemon.start(env={"TRAINSUP_RESCAN_INTERVAL": "0.3"})
        daemon.wait_ready("mm")
        write_checkpoint(ck, 1, {"state.json": b'{"step": 1}', "w.bin": b"\1" * (1 << 20)})
        write_checkpoint(ck, 2, {"state.json": b'{"step": 2}', "w.bin": b"\2" * (1 << 20)})
        m = shared_map(ck / "step-00000002" / "w.bin")
        try:
            m[10:11] = b"\2"                          # the first mapped write moves ctime ...
            time.sleep(1.5)                           # ... the daemon re-verifies: still valid
            listing = daemon.request("checkpoints", "mm")["result"]
            assert [c["valid"] for c in listing if c["format"] == "trainsup"] == [True, True]
            m[20:21] = b"\xff"                        # ... this one does not move it
            time.sleep(1.0)
            listing = daemon.request("checkpoints", "mm")["result"]
            assert [c["valid"] for c in listing if c["format"] == "trainsup"] == [True, True], \
                "the setup did not reproduce the stale cached verdict"
            assert daemon.request("restart", "mm", no_save=True)["ok"]
            start = daemon.wait_ready("mm", starts=2)
            assert start["resume"] == str(ck / "step-00000001"), start
        finally:
            m.close()
    finally:
        daemon.terminate()
        subprocess.run(["umount", "-l", str(ck)], check=False)


def test_mmap_damage_on_tmpfs_right_after_validation_is_never_offered_20_of_20(daemon):
    """Found: a checkpoint on tmpfs changed through a shared mmap right after it was
    validated was still handed to the next launch as TRAINSUP_RESUME_FROM in about 1 run of
    3. Twenty runs, each relaunch by `restart` or by a crash relaunched at once (backoff 0:
    the path that trusted the refresh after the exit): not one may offer the damaged copy."""
    ck = daemon.root / "mm20-ckpt"
    ck.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "none", str(ck)], check=True)
    try:
        daemon.fakejob("mm", ckpt=False, extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 100\n"
                       "restart: {max_restarts: 100, max_restarts_without_progress: 100, "
                       "start_limit_interval: 0s, backoff: {initial: 0s, max: 0s}}\n")
        daemon.start()
        daemon.wait_ready("mm")
        # The job's dir is busy, as a training job's is (logs, other saves): every change is
        # a scan, and a scan that read the old verdict back from the cache after the
        # pre-launch re-proof undid it.
        stop = threading.Event()

        def busy() -> None:
            n = 0
            while not stop.is_set():
                (ck / "train.log").write_text(f"line {n}\n")
                n += 1
                time.sleep(0.002)
        noise = threading.Thread(target=busy, daemon=True)
        noise.start()
        offered = []
        for run in range(20):
            intact, damaged = 2 * run + 1, 2 * run + 2
            write_checkpoint(ck, intact, {"state.json": b'{"step": %d}' % intact, "w.bin": b"\1" * (1 << 20)})
            write_checkpoint(ck, damaged, {"state.json": b'{"step": %d}' % damaged, "w.bin": b"\2" * (1 << 20)})
            # The writer keeps the file mapped: its first write fault moves ctime (then
            # the daemon verifies the content as it is) ...
            m = shared_map(ck / f"step-{damaged:08d}" / "w.bin")
            m[10:11] = b"\2"
            marker = ck / f"seen-{run}"
            marker.write_text("")

            def verified() -> bool:
                listing = daemon.request("checkpoints", "mm")["result"]
                return (any(c["path"] == str(marker) for c in listing)      # scanned after the fault
                        and any(c["step"] == damaged and c["valid"] for c in listing))
            wait_for(verified, 15, f"step {damaged} verified after the first write fault")
            try:
                m[20:21] = b"\xff"        # ... and right after that it changes: ctime stays put
                if run % 2:
                    os.kill(daemon.status("mm")["pid"], 9)   # a crash: relaunched at once
                else:
                    assert daemon.request("restart", "mm", no_save=True)["ok"]
                start = daemon.wait_ready("mm", starts=run + 2)
            finally:
                m.close()
            offered.append(start["resume"])
            assert start["resume"] == str(ck / f"step-{intact:08d}"), (run, offered)
        stop.set()
        noise.join(5)
    finally:
        daemon.terminate()
        subprocess.run(["umount", "-l", str(ck)], check=False)
