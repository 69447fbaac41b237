"""The watcher wakes the daemon on landings and on the dir itself changing."""

import os
import shutil
import threading
import time

import pytest
from conftest import deadline_for
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.watch import CheckpointWatcher, ObserverHub


class Recorder:
    def __init__(self):
        self.reasons = []
        self.cond = threading.Condition()

    def __call__(self, reason):
        with self.cond:
            self.reasons.append(reason)
            self.cond.notify_all()

    def wait_for(self, pred, timeout=5.0):
        timeout = deadline_for(timeout)       # an event wait, under the suite's one factor
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.reasons):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"condition not met within {timeout}s; saw {self.reasons[-5:]}")
                self.cond.wait(left)

    def clear(self):
        with self.cond:
            self.reasons.clear()


@pytest.fixture
def hub():
    h = ObserverHub()
    yield h
    h.stop()


def test_landing_fires_on_change(tmp_path, hub):
    ck = tmp_path / "ck"
    ck.mkdir()
    rec = Recorder()
    w = CheckpointWatcher(ck, rec, hub=hub)
    w.start()
    try:
        write_checkpoint(ck, 1, {"x": b"1"})
        rec.wait_for(lambda r: "changed" in r)
    finally:
        w.stop()


def test_dir_deleted_recreated_and_replaced_by_symlink(tmp_path, hub):
    ck = tmp_path / "ck"
    ck.mkdir()
    rec = Recorder()
    w = CheckpointWatcher(ck, rec, hub=hub)
    w.start()
    try:
        shutil.rmtree(ck)
        rec.wait_for(lambda r: "dir-deleted" in r)
        ck.mkdir()
        rec.wait_for(lambda r: "dir-created" in r)
        assert w.armed
        rec.clear()
        write_checkpoint(ck, 2, {"x": b"2"})              # the re-armed watch sees a landing
        rec.wait_for(lambda r: "changed" in r)
        os.rename(ck, tmp_path / "old")
        rec.wait_for(lambda r: "dir-moved" in r)
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", ck)
        rec.wait_for(lambda r: "dir-created" in r[-1:])
        assert not w.armed                                 # never watch through a link
    finally:
        w.stop()


def test_many_watchers_share_one_observer(tmp_path, hub):
    recs, ws = [], []
    for k in range(20):
        d = tmp_path / f"job{k}" / "ck"
        d.mkdir(parents=True)
        recs.append(Recorder())
        ws.append(CheckpointWatcher(d, recs[-1], hub=hub))
        ws[-1].start()
    try:
        write_checkpoint(tmp_path / "job7" / "ck", 1, {"x": b"1"})
        recs[7].wait_for(lambda r: "changed" in r)
        ws[3].stop()                                       # others keep working
        write_checkpoint(tmp_path / "job8" / "ck", 1, {"x": b"1"})
        recs[8].wait_for(lambda r: "changed" in r)
        assert recs[3].reasons == []
    finally:
        for w in ws:
            w.stop()


def test_ten_thousand_files_at_once(tmp_path, hub):
    ck = tmp_path / "ck"
    ck.mkdir()
    rec = Recorder()
    w = CheckpointWatcher(ck, rec, hub=hub)
    w.start()
    try:
        steps = []
        for i in range(10_000):
            with open(ck / f"junk{i}.log", "wb"):
                pass
            if i % 2000 == 1999:
                steps.append(i)
                write_checkpoint(ck, i, {"x": b"1"})
        rec.wait_for(lambda r: len(r) > 0)
        infos = [i for i in scan(ck) if i.managed]        # junk*.log: listed, unmanaged
        assert [i.step for i in infos] == steps and all(i.valid for i in infos)
    finally:
        w.stop()
