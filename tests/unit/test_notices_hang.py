"""Hang detection: the pure decision, progress mtimes on real files, a real SIGSTOP."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import wait_for
from trainsup.daemon.notices.hang import ProgressClock, hang_decision, is_stopped, progress_mtime


@pytest.mark.parametrize("now,last,timeout,hung", [
    (100.0, 0.0, None, False),        # hang detection off
    (100.0, 0.0, 100.0, True),
    (99.9, 0.0, 100.0, False),
    (1000.0, 950.0, 60.0, False),
    (1000.0, 900.0, 60.0, True),
])
def test_hang_decision(now, last, timeout, hung):
    assert hang_decision(now, last, timeout) is hung


def test_progress_mtime_takes_the_newest_of_heartbeat_and_checkpoints(tmp_path):
    hb, ckpt = tmp_path / "heartbeat", tmp_path / "ckpt"
    assert progress_mtime(hb, ckpt) is None            # neither exists yet
    assert progress_mtime(None, None) is None
    ckpt.mkdir()
    assert progress_mtime(hb, ckpt) is None            # empty dir: the dir itself is no progress
    (ckpt / "step-00000001").mkdir()
    os.utime(ckpt / "step-00000001", (1000, 1000))
    assert progress_mtime(hb, ckpt) == 1000
    hb.touch()
    os.utime(hb, (2000, 2000))
    assert progress_mtime(hb, ckpt) == 2000
    (ckpt / ".trainsup-tmp").mkdir()                   # a save in progress is progress
    os.utime(ckpt / ".trainsup-tmp", (3000, 3000))
    assert progress_mtime(hb, ckpt) == 3000
    os.symlink("/nonexistent", ckpt / "dangling")      # not followed, not an error
    os.utime(ckpt / "dangling", (500, 500), follow_symlinks=False)
    assert progress_mtime(hb, ckpt) == 3000


def test_progress_clock_moves_only_when_an_mtime_changes():
    clock = ProgressClock(now_mono=10.0)
    assert clock.observe(None, 20.0) == 10.0
    assert clock.observe(1000.0, 30.0) == 30.0
    assert clock.observe(1000.0, 40.0) == 30.0         # same mtime: no progress
    assert clock.observe(999.0, 50.0) == 50.0          # the wall clock went back: still a change
    assert hang_decision(200.0, clock.observe(999.0, 200.0), 100.0)


def test_is_stopped_sees_a_sigstopped_process():
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not is_stopped(p.pid)
        os.kill(p.pid, signal.SIGSTOP)
        wait_for(lambda: is_stopped(p.pid), 5, "the SIGSTOPped process to show as stopped", 0.01)
        os.kill(p.pid, signal.SIGCONT)
        wait_for(lambda: not is_stopped(p.pid), 5, "the SIGCONTed process to run again", 0.01)
    finally:
        p.kill()
        p.wait()
    assert not is_stopped(p.pid)                       # gone: not stopped
