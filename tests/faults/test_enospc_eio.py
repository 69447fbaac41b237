"""A full disk and a failing disk, for the checkpoint writer and for the daemon's own state.

The writer's fsync faults are injected in-process (os.fsync raising ENOSPC/EIO at the Nth
call: a real disk cannot be made to fail one fsync on demand). A real full disk for the
writer is tests/faults/test_checkpoint_writer_faults.py::test_enospc_during_save_raises_and_cleans_up;
here the daemon's state dir lives on a real 2 MiB tmpfs that the test fills.
"""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
from _support import fill, snapshot, tmpfs
from trainsup.checkpoint import SaveError, write_checkpoint
from trainsup.checkpoint.index import latest_valid, scan


def _count_fsyncs(tmp_path) -> int:
    real = os.fsync
    n = [0]

    def counting(fd):
        n[0] += 1
        return real(fd)
    os.fsync = counting
    try:
        write_checkpoint(tmp_path / "probe", 1, {"a": b"1", "b": b"2"})
    finally:
        os.fsync = real
    return n[0]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_failed_fsync_at_every_step_keeps_previous_checkpoints(tmp_path, monkeypatch, err):
    total = _count_fsyncs(tmp_path)
    assert total >= 5
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"a": b"one" * 1000, "b": b"uno"})
    write_checkpoint(ck, 2, {"a": b"two" * 1000, "b": b"dos"})
    before = snapshot(ck)
    real = os.fsync
    for nth in range(1, total + 1):
        calls = [0]

        def failing(fd, nth=nth):
            calls[0] += 1
            if calls[0] == nth:
                raise OSError(err, os.strerror(err))
            return real(fd)
        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(SaveError) as e:
            write_checkpoint(ck, 3, {"a": b"three" * 1000, "b": b"tres"})
        monkeypatch.setattr(os, "fsync", real)
        assert e.value.errno == err, f"fsync #{nth}: the error lost its errno: {e.value!r}"
        # A failed fsync is never retried and nothing half-committed stays behind, even
        # when it was the last one (the dir fsync after the rename).
        assert snapshot(ck) == before, f"fsync #{nth} failing changed the checkpoint dir"
        assert os.listdir(ck / ".trainsup-tmp") == []
        infos = scan(ck)
        assert [i.step for i in infos] == [1, 2] and latest_valid(infos).step == 2


def test_daemon_state_on_a_full_disk_keeps_running_and_keeps_the_old_state(daemon):
    with tmpfs("2m") as mnt:
        state = mnt / "state"
        daemon.state = state
        daemon.fakejob("full", "--catch-usr1", ckpt=False, extra="stop_timeout: 2s\n")
        daemon.start()
        daemon.wait_ready("full")
        st = daemon.wait_state("full", "running")
        attempt_before = st["attempt"]
        filled = fill(mnt / "filler")
        assert filled > 0
        # Every restart writes events and the job row: all of them now hit ENOSPC.
        for i in range(3):
            r = daemon.request("restart", "full", no_save=True)
            assert r["ok"], r
            daemon.wait_ready("full", 2 + i)
            assert daemon.proc.poll() is None, daemon.log_text()[-2000:]
        st = daemon.wait_state("full", "running")
        assert st["attempt"] == attempt_before + 3       # supervision went on in memory
        assert "cannot" in daemon.log_text() and "full" in daemon.log_text()
        c = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
        assert c.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        c.close()
        (mnt / "filler").unlink()
        assert daemon.terminate() == 0
        daemon.start()
        assert not list(state.glob("state.db.corrupt-*")), "the state written before the disk filled was lost"
        st = daemon.wait_state("full", "running")
        assert st["attempt"] > attempt_before
        launches = [e for e in daemon.history("full") if e["kind"] == "launch"]
        assert launches[0]["attempt"] == 1
        assert daemon.terminate() == 0
