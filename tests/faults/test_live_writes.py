"""Issue 11 case 5: never delete a save that is still being written — through a real
daemon (5a slow single-file save with grace 0, 5b under a +1 h wall-clock step via an
LD_PRELOAD clock_gettime shim, 5c torch.save rewriting latest.pth in place) — and the
liveness rules themselves on real processes and files."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_records, wait_for
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.custody import JobCheckpointDir
from trainsup.spec import CheckpointSpec

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


@pytest.fixture(scope="module")
def clock_shim(tmp_path_factory):
    out = tmp_path_factory.mktemp("shim") / "clockshift.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(HELPERS / "clockshift.c"), "-ldl"],
                   check=True)
    return out


def _job(daemon, name, cmd, extra=""):
    body = (f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
            f"env: {{PYTHONPATH: {json.dumps(str(REPO))}}}\n"
            f"checkpoint:\n  dir: {daemon.root / (name + '-ckpt')}\n  keep_last: 1\n  keep_best: 0\n{extra}")
    daemon.write_job(name, body)


def test_slow_single_file_save_under_clock_step_is_committed(daemon, clock_shim):
    """5a + 5b: grace 0, a save of one file growing for 6 s, the daemon's wall clock an hour
    ahead: the tmp dir (its mtime frozen once the file exists) was judged stale and deleted
    under its writer, so such a save could never complete."""
    rec = daemon.root / "slow.rec"
    _job(daemon, "slow", [sys.executable, str(HELPERS / "slowsave.py"), "--seconds", "12", "--record", str(rec)],
         "emergency_save:\n  grace: 0s\n")
    daemon.start(env={"LD_PRELOAD": str(clock_shim), "TRAINSUP_TEST_CLOCK_SHIFT": "3600",
                      "TRAINSUP_RESCAN_INTERVAL": "0.3"})          # a rescan (and pass) every 0.3 s
    wait_for(lambda: any(r["event"] == "slow-save" for r in read_records(rec)), 20, "the slow save to start")
    # proof that rotation passes ran while the save was under way: a broken entry planted
    # now (invalid, older than the newest valid) is collected once quiet, before the commit
    planted = daemon.root / "slow-ckpt" / "step-00000000"
    planted.mkdir()
    done = lambda: [r for r in read_records(rec) if r["event"] in ("committed", "save-failed")]  # noqa: E731
    wait_for(lambda: done() or not planted.exists(), 30, "a rotation pass during the save")
    assert not done() and not planted.exists(), "no rotation pass ran during the slow save"
    wait_for(done, 30, "the slow save to finish")
    assert done()[0]["event"] == "committed", done()
    final = daemon.root / "slow-ckpt" / "step-00000003"
    assert (final / "w.bin").stat().st_size > 0 and (final / "MANIFEST.json").exists()
    assert not [e for e in daemon.history("slow") if e["kind"] == "deleted" and ".trainsup-tmp" in e["path"]]


def test_torch_save_rewriting_latest_in_place_is_never_deleted(daemon):
    """5c: torch.save truncates latest.pth then writes it: for a moment it is 0 bytes with
    an old mtime, sorted as invalid-and-older, and was deleted (7 of 25 saves; after the
    last epoch it was gone for good)."""
    pytest.importorskip("torch")
    rec = daemon.root / "inplace.rec"
    _job(daemon, "inplace", [sys.executable, str(HELPERS / "inplace_torch.py"), "200", str(rec)],
         "restart:\n  policy: never\n")
    daemon.start()
    wait_for(lambda: read_records(rec), 120, "200 in-place saves")
    daemon.request("checkpoints", "inplace")
    hist = daemon.history("inplace")
    assert not [e for e in hist if e["kind"] == "deleted" and e["path"].endswith("latest.pth")]
    import torch
    state = torch.load(daemon.root / "inplace-ckpt" / "latest.pth", weights_only=True)
    assert state["step"] == 200


# ----------------------------------------------------------------------------- the rules

def _jd(ck: Path, grace: float = 0.0) -> JobCheckpointDir:
    jd = JobCheckpointDir("j", CheckpointSpec(dir=ck, keep_last=1, keep_best=0), grace, None)
    jd.open()
    return jd


def test_tmp_dir_of_live_writer_kept_dead_writer_collected(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w": b"1"})
    write_checkpoint(ck, 2, {"w": b"2"})
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (writer.pid, _dead_pid()):
            d = ck / ".trainsup-tmp" / f"step-00000003.{pid}"
            d.mkdir(parents=True)
            (d / "w").write_bytes(b"partial")
        clock = [1000.0]
        jd = _jd(ck)
        jd.liveness.clock = lambda: clock[0]
        infos, flag = jd.scan(None)
        assert flag is None
        jd.observe(infos)
        clock[0] += 3600                      # an hour of monotonic time with no change
        infos, _ = jd.scan(None)
        jd.observe(infos)
        plan = jd.plan(infos)
        deleted = {i.name for i in plan.delete}
        assert f"step-00000003.{writer.pid}" not in deleted        # writer alive: never
        assert f"step-00000003.{_dead_pid()}" in deleted           # writer gone, quiet: collected
        assert "step-00000002" not in deleted
    finally:
        writer.kill()
        writer.wait()


_DEAD: list[int] = []


def _dead_pid() -> int:
    if not _DEAD:
        p = subprocess.Popen(["true"])
        p.wait()
        _DEAD.append(p.pid)
    return _DEAD[0]


def test_reused_writer_pid_started_later_is_not_the_writer(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w": b"1"})
    me = os.getpid()
    d = ck / ".trainsup-tmp" / f"step-00000002.{me}"
    d.mkdir(parents=True)
    jd = _jd(ck)
    clock = [0.0]
    jd.liveness.clock = lambda: clock[0]
    jd.liveness.boot_clock = lambda: 1.0          # "first seen" at boot+1 s: before we started
    infos, _ = jd.scan(None)
    jd.observe(infos)
    clock[0] += 3600
    assert f"step-00000002.{me}" in {i.name for i in jd.plan(infos).delete}


@contextlib.contextmanager
def _held_open(path: Path, mode: str):
    """A real process (standing in for the job) holding `path` open until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", f"import sys,time; f=open(sys.argv[1],{mode!r}); "
                               "print('open', flush=True); time.sleep(60)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_file_open_by_the_job_is_live(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w": b"1"})
    (ck / "step_2.pt").write_bytes(b"")                       # being written: 0 bytes, invalid
    with _held_open(ck / "step_2.pt", "ab") as holder:
        jd = _jd(ck)
        clock = [0.0]
        jd.liveness.clock = lambda: clock[0]
        infos, _ = jd.scan(None)
        jd.observe(infos)
        clock[0] += 3600
        assert "step_2.pt" in {i.name for i in jd.plan(infos).delete}     # no job pid given
        opened = jd.open_by_job(infos, [holder.pid])
        assert opened == {"step_2.pt"}
        assert "step_2.pt" not in {i.name for i in jd.plan(infos, also_live=opened).delete}


def test_growing_file_is_live_by_monotonic_observation(tmp_path):
    ck = tmp_path / "ck"
    write_checkpoint(ck, 1, {"w": b"1"})
    f = ck / "step_2.pt"
    f.write_bytes(b"x")
    jd = _jd(ck, grace=0.0)
    clock = [0.0]
    jd.liveness.clock = lambda: clock[0]
    for _ in range(5):                                        # changes every 50 s of monotonic time
        infos, _ = jd.scan(None)
        jd.observe(infos)
        assert "step_2.pt" not in {i.name for i in jd.plan(infos).delete}
        clock[0] += 50
        with open(f, "ab") as fh:
            fh.write(b"more")
    infos, _ = jd.scan(None)                                  # the daemon sees the last write
    jd.observe(infos)
    assert "step_2.pt" not in {i.name for i in jd.plan(infos).delete}
    clock[0] += 61                                            # then quiet: grace 0 + 60 s
    infos, _ = jd.scan(None)
    jd.observe(infos)
    assert "step_2.pt" in {i.name for i in jd.plan(infos).delete}


HOLDER = r"""
import os, sys, time, zipfile
d, rec = sys.argv[1], sys.argv[2]
for s in (1, 2, 3):
    with zipfile.ZipFile(os.path.join(d, f".t{s}"), "w") as z:
        z.writestr("archive/data.pkl", b"state %d" % s)
    os.rename(os.path.join(d, f".t{s}"), os.path.join(d, f"step_{s}.pt"))
f = open(os.path.join(d, "step_4.pt"), "wb")          # opened, then quiet for 9 s (gathering state)
open(rec, "w").write("holding")
time.sleep(9)
with zipfile.ZipFile(f, "w") as z:
    z.writestr("archive/data.pkl", b"state 4")
f.close()
open(rec, "w").write("written")
time.sleep(3600)
"""


def test_file_held_open_by_the_job_survives_a_quiet_spell(daemon):
    """5: an entry is in progress while a process of the job still has it open, even when
    nothing in it changed for longer than the quiet window (grace 0 + 5 s)."""
    rec = daemon.root / "holder.state"
    script = daemon.root / "holder.py"
    script.write_text(HOLDER)
    ck = daemon.root / "hold-ckpt"
    _job(daemon, "hold", [sys.executable, str(script), str(ck), str(rec)], "emergency_save:\n  grace: 0s\n")
    daemon.start(env={"TRAINSUP_RESCAN_INTERVAL": "0.3"})
    wait_for(lambda: rec.exists() and rec.read_text() == "written", 30, "the held save to be written")
    hist = daemon.history("hold")
    assert not [e for e in hist if e["kind"] == "deleted" and e["path"].endswith("step_4.pt")]
    wait_for(lambda: sorted(p.name for p in ck.iterdir() if p.name.endswith(".pt")) == ["step_4.pt"], 20,
             "rotation to keep only the newest (keep_last 1)")


def _zip_pt(path: Path, payload: bytes) -> None:
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)


def test_valid_file_written_in_place_is_rotated_once_complete_not_after_the_grace(tmp_path):
    """Found with Keras' ModelCheckpoint (h5py writes each epoch file in place) and TF
    (saves sighted mid-write): every save was seen changing, so each stayed live for
    grace + 5 s although its format proved it finished, and rotation fell a grace's worth
    of saves behind its quota (42 TF saves, 344 MB over a 4 KB quota in 25 s)."""
    ck = tmp_path / "ck"
    ck.mkdir()
    jd = _jd(ck, grace=120.0)
    clock = [0.0]
    jd.liveness.clock = lambda: clock[0]
    old = ck / "step_1.pt"
    old.write_bytes(b"PK\x03\x04partial")                    # seen mid-write: invalid
    infos, _ = jd.scan(None)
    jd.observe(infos)
    assert "step_1.pt" not in {i.name for i in jd.plan(infos).delete}     # a save under way
    _zip_pt(old, b"state 1")                                  # finished in place: valid, moved
    _zip_pt(ck / "step_2.pt", b"state 2")
    clock[0] += 0.5
    infos, _ = jd.scan(None)
    jd.observe(infos)
    assert all(i.valid for i in infos if i.name in ("step_1.pt", "step_2.pt")), infos
    assert "step_1.pt" in {i.name for i in jd.plan(infos).delete}         # not 125 s later
    # ... unless a process of the job still holds it open (a writer not done with it)
    with _held_open(old, "rb") as holder:
        opened = jd.open_by_job(infos, [holder.pid])
        assert "step_1.pt" not in {i.name for i in jd.plan(infos, also_live=opened).delete}


def test_invalid_file_that_moved_stays_live_for_the_whole_quiet_window(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    _zip_pt(ck / "step_2.pt", b"state 2")
    jd = _jd(ck, grace=120.0)
    clock = [0.0]
    jd.liveness.clock = lambda: clock[0]
    part = ck / "step_1.pt"
    part.write_bytes(b"PK\x03\x04partial")
    infos, _ = jd.scan(None)
    jd.observe(infos)
    with open(part, "ab") as f:
        f.write(b"more")                                       # still being written, in place
    clock[0] += 1
    infos, _ = jd.scan(None)
    jd.observe(infos)
    clock[0] += 60                                             # past the settle window, inside grace
    infos, _ = jd.scan(None)
    jd.observe(infos)
    assert "step_1.pt" not in {i.name for i in jd.plan(infos).delete}
    clock[0] += 65                                             # past grace + margin: collected
    infos, _ = jd.scan(None)
    jd.observe(infos)
    assert "step_1.pt" in {i.name for i in jd.plan(infos).delete}
