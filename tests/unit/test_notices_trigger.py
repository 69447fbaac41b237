"""The trigger file, watched with inotify on a real folder."""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest
from conftest import deadline_for, wait_for
from trainsup.daemon.notices.trigger import TriggerFile


class Calls:
    def __init__(self):
        self.cond = threading.Condition()
        self.notices = []

    def __call__(self, notice):
        with self.cond:
            self.notices.append((time.monotonic(), notice))
            self.cond.notify_all()

    def wait(self, n, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.notices) >= n, deadline_for(timeout)), \
                f"expected {n} notices, got {len(self.notices)}"
            return self.notices[n - 1]


def wait_until(cond, timeout=5.0, what="condition"):
    wait_for(cond, timeout, what, interval=0.002)


@pytest.fixture
def watch(tmp_path):
    calls = Calls()
    trig = TriggerFile(tmp_path / "preempt-now", calls)
    yield trig, calls
    trig.stop()


def test_creating_the_file_fires_once(watch):
    trig, calls = watch
    trig.start()
    trig.path.write_text("x")
    _, notice = calls.wait(1)
    assert (notice.source, notice.kind, notice.deadline) == ("trigger-file", "preempt", None)
    assert str(trig.path) in notice.detail
    trig.path.write_text("again")                 # modified, not re-created
    os.utime(trig.path)
    (trig.path.parent / "other-file").write_text("x")
    time.sleep(0.3)   # settle window: none of these may fire
    assert len(calls.notices) == 1


def test_moving_a_file_into_place_fires(watch):
    trig, calls = watch
    trig.start()
    tmp = trig.path.parent / ".preempt-now.tmp"
    tmp.write_text("x")
    os.rename(tmp, trig.path)
    assert "moved into place" in calls.wait(1)[1].detail


def test_present_at_start_fires_once_at_start(watch):
    trig, calls = watch
    trig.path.write_text("x")
    trig.start()
    assert "present at start" in calls.wait(1)[1].detail
    time.sleep(0.2)   # settle window: the existing file must not fire a second time
    assert len(calls.notices) == 1


def test_removed_and_created_again_fires_again(watch):
    trig, calls = watch
    trig.start()
    trig.path.touch()
    calls.wait(1)
    trig.path.unlink()
    wait_until(lambda: trig.armed, what="the removal to be seen")
    trig.path.touch()
    calls.wait(2)


def test_missing_parent_folder_is_created(tmp_path):
    calls = Calls()
    trig = TriggerFile(tmp_path / "run" / "trainsup" / "preempt", calls)
    try:
        trig.start()
        trig.path.touch()
        calls.wait(1)
    finally:
        trig.stop()


def test_no_callback_after_stop(watch):
    trig, calls = watch
    trig.start()
    trig.stop()
    trig.path.touch()
    time.sleep(0.2)   # settle window: a stopped watch must stay silent
    assert calls.notices == []


def test_creation_to_callback_latency(watch):
    trig, calls = watch
    trig.start()
    lat = []
    for i in range(30):
        wait_until(lambda: trig.armed, what="re-arm")
        t0 = time.monotonic()
        fd = os.open(trig.path, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        t1, _ = calls.wait(i + 1)
        lat.append(t1 - t0)
        trig.path.unlink()
    median = statistics.median(lat)
    print(f"\ntrigger file creation -> callback: median {median * 1000:.2f} ms, "
          f"max {max(lat) * 1000:.2f} ms over {len(lat)}")
    assert median < 0.1
