"""The watcher wakes the daemon on landings and on the dir itself changing."""

import ctypes
import os
import shutil
import subprocess
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


# ---------------------------------------------------------------- a job's dir shape is its own

def _chain(root, depth):
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


@pytest.fixture
def rm_after():
    made = []
    yield made
    for p in made:       # rm (fts) copes with a 3000-deep chain; pytest's own cleanup does not
        subprocess.run(["rm", "-rf", "--", str(p)], check=False, timeout=300)


def test_3000_deep_chain_in_one_jobs_dir_keeps_every_job_watched(tmp_path, hub, rm_after):
    """Found: watchdog's recursive walk of a 3000-deep chain raised RecursionError in the one
    reader thread all jobs share; from then on no dir was watched, for the daemon's life."""
    a, b = tmp_path / "a" / "ck", tmp_path / "b" / "ck"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    rm_after.append(tmp_path / "a")
    _chain(a, 3000)
    ra, rb = Recorder(), Recorder()
    wa, wb = CheckpointWatcher(a, ra, hub=hub), CheckpointWatcher(b, rb, hub=hub)
    wa.start()
    wb.start()
    try:
        assert wa.watch_count() <= 2 + wa.sub_budget
        (a / "d" / "d" / "x").write_bytes(b"1")          # inside A's watched levels
        ra.wait_for(lambda r: "changed" in r)
        write_checkpoint(b, 1, {"x": b"1"})                  # the other job: still told
        rb.wait_for(lambda r: "changed" in r)
        assert hub.thread is not None and hub.thread.is_alive()
    finally:
        wa.stop()
        wb.stop()


def test_3000_empty_dirs_under_a_dot_dir_take_no_watches(tmp_path, hub):
    """Found: 3000 empty dirs under a dot-dir added 3001 inotify watches charged to root's
    host-wide max_user_watches."""
    ck = tmp_path / "ck"
    (ck / ".hidden").mkdir(parents=True)
    for i in range(3000):
        (ck / ".hidden" / f"d{i}").mkdir()
    for i in range(200):                  # and many plain dirs: the budget holds
        (ck / f"e{i}").mkdir()
    w = CheckpointWatcher(ck, Recorder(), hub=hub)
    w.start()
    try:
        assert w.watch_count() <= 2 + w.sub_budget
        assert hub.watches() <= 2 + w.sub_budget
    finally:
        w.stop()
    assert hub.watches() == 0


def test_newest_entry_dirs_are_watched_within_the_budget(tmp_path, hub):
    """HF completes a checkpoint inside its entry dir: a new entry is watched (the oldest
    watch gives way past the budget), and so is Lightning's nested save dir."""
    ck = tmp_path / "ck"
    ck.mkdir()
    rec = Recorder()
    w = CheckpointWatcher(ck, rec, hub=hub, sub_watches=4)
    w.start()
    try:
        for k in range(8):
            (ck / f"checkpoint-{k}").mkdir()
            rec.wait_for(lambda r: len(r) > 0)
            rec.clear()
        assert w.watch_count() <= 2 + 4
        (ck / "checkpoint-7" / "trainer_state.json").write_text("{}")     # the newest: watched
        rec.wait_for(lambda r: "changed" in r)
        rec.clear()
        (ck / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
        rec.wait_for(lambda r: len(r) > 0)
        deadline = time.monotonic() + 5
        while True:               # the nested dirs are watched as they appear (or at once when moved in)
            rec.clear()
            (ck / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=1.ckpt").write_bytes(b"x")
            try:
                rec.wait_for(lambda r: "changed" in r, 0.5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "a save in lightning_logs/version_0/checkpoints/ never seen"
    finally:
        w.stop()


def test_reader_thread_killed_is_started_again_and_every_job_told(tmp_path, hub):
    """The reader thread all jobs share: killed (an exception raised inside it), it starts
    again, every watcher is told to rescan, and later events are delivered."""
    ck = tmp_path / "ck"
    ck.mkdir()
    rec = Recorder()
    w = CheckpointWatcher(ck, rec, hub=hub)
    w.start()
    try:
        t = hub.thread
        assert t is not None and t.ident is not None
        before = hub.restarts
        n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(SystemExit))
        assert n == 1
        deadline = time.monotonic() + 10
        while hub.restarts == before:
            assert time.monotonic() < deadline, "the reader thread was not started again"
            time.sleep(0.05)
        rec.wait_for(lambda r: "changed" in r)            # told to rescan
        rec.clear()
        write_checkpoint(ck, 1, {"x": b"1"})
        rec.wait_for(lambda r: "changed" in r)
    finally:
        w.stop()


def test_a_failing_callback_is_confined_to_its_job(tmp_path, hub):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    def boom(_reason):
        raise RuntimeError("a job's callback failing")
    rb = Recorder()
    wa, wb = CheckpointWatcher(a, boom, hub=hub), CheckpointWatcher(b, rb, hub=hub)
    wa.start()
    wb.start()
    try:
        (a / "x").write_bytes(b"1")
        write_checkpoint(b, 1, {"x": b"1"})
        rb.wait_for(lambda r: "changed" in r)
        assert hub.thread is not None and hub.thread.is_alive()
    finally:
        wa.stop()
        wb.stop()
