"""What the daemon and trainsup-shim exchange (issue 21): the exit status file, the shim's
command line and start report, run against the real compiled shim where it matters."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from trainsup.cli.render import ADOPTED_MARK, format_status
from trainsup.control.protocol import table_row
from trainsup.daemon import notice_file
from trainsup.daemon.joblog import Followers
from trainsup.daemon.launch import shim

needs_shim = pytest.mark.skipif(shim.why_unavailable() is not None, reason=f"no shim: {shim.why_unavailable()}")


def test_a_status_file_is_read_exactly_and_anything_else_is_refused(tmp_path):
    p = tmp_path / "job.3"
    p.write_text("trainsup-exit 1\npid 4242\nstatus 1792\nat 1700000000.123456789\n")
    st = shim.read_status(p)
    assert st == shim.ExitStatus(4242, 1792, 1700000000.123456789) and st.returncode == 7
    p.write_text("trainsup-exit 1\npid 4242\nstatus 9\nat 1.5\n")        # killed by SIGKILL
    assert shim.read_status(p).returncode == -signal.SIGKILL
    for bad in ("", "trainsup-exit 2\npid 1\nstatus 0\nat 1\n", "trainsup-exit 1\npid x\nstatus 0\nat 1\n",
                "trainsup-exit 1\npid 1\nat 1\n", "garbage" * 100):
        p.write_text(bad)
        assert shim.read_status(p) is None, bad
    assert shim.read_status(tmp_path / "missing") is None
    os.symlink(tmp_path / "job.3", tmp_path / "link")
    assert shim.read_status(tmp_path / "link") is None                    # never through a link


def test_the_shim_command_line_names_its_launch():
    plan = shim.Plan("trainsup-abc/job.2", Path("/s/exits/job.2"), Path("/l/job.log"), 1000, 3)
    argv = plan.argv([b"/usr/bin/python3"], ["python3", "-c", "x"], "/w", 1000, 1000, [1000, 27])
    assert argv[:2] == [b"trainsup-shim", b"trainsup-abc/job.2"]
    assert argv[6:11] == [b"/w", b"1000", b"1000", b"1000,27", b"1"]
    assert argv[11:] == [b"/usr/bin/python3", b"--", b"python3", b"-c", b"x"]
    assert plan.argv([b"/bin/true"], ["true"], "/", None, None, [])[7:10] == [b"-1", b"-1", b"-"]


@needs_shim
def test_the_real_shim_writes_the_log_and_the_status_and_reports_its_start(tmp_path):
    status, log = tmp_path / "exits" / "j.1", tmp_path / "j.log"
    status.parent.mkdir()
    plan = shim.Plan("t/j.1", status, log, 60, 2)
    argv = plan.argv([b"/bin/sh"], ["sh", "-c", "echo out; echo err >&2; for i in 1 2 3 4 5 6; do "
                                    "echo line-of-output-$i; sleep 0.02; done; exit 7"], str(tmp_path), None, None, [])
    r, w = os.pipe()
    p = subprocess.Popen(argv, executable=str(shim.SHIM), stdout=w, stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(w)
    try:
        job = shim.read_start(r, 10)
    finally:
        os.close(r)
    assert job > 0 and job != p.pid
    assert p.wait(10) == 0
    st = shim.read_status(status)
    assert st is not None and st.pid == job and st.returncode == 7 and abs(st.at - time.time()) < 10
    # Rotated at 60 bytes (116 bytes written): every line is in the two files, in order.
    files = sorted(tmp_path.glob("j.log*"), key=lambda f: -int(f.suffix[1:]) if f.suffix[1:].isdigit() else 0)
    assert [f.name for f in files] == ["j.log.1", "j.log"]
    text = "".join(f.read_text() for f in files)
    assert text.split() == ["out", "err", *[f"line-of-output-{i}" for i in range(1, 7)]], text
    assert all(p.stat().st_size <= 60 for p in tmp_path.glob("j.log*"))


@needs_shim
def test_the_real_shim_reports_a_command_it_cannot_start(tmp_path):
    plan = shim.Plan("t/j.1", tmp_path / "s", tmp_path / "log", 1000, 0)
    r, w = os.pipe()
    p = subprocess.Popen(plan.argv([b"/nonexistent/cmd"], ["cmd"], "/", None, None, []), executable=str(shim.SHIM),
                         stdout=w, stdin=subprocess.DEVNULL)
    os.close(w)
    with pytest.raises(shim.ShimFailed) as e:
        shim.read_start(r, 10)
    os.close(r)
    assert e.value.errno == 2 and e.value.filename == "exec"
    p.wait(10)
    assert not (tmp_path / "s").exists()


def test_followers_tell_their_log_when_the_first_comes_and_the_last_goes():
    calls = []
    f = Followers(lambda: calls.append(len(f)))
    f.add("a")
    f |= {"b"}
    f.discard("a")
    f.clear()
    assert calls == [1, 2, 1, 0]


def test_notice_ids_go_on_from_the_last_one_written(tmp_path):
    path = notice_file.path_of(tmp_path, "j")
    path.parent.mkdir(parents=True)
    assert notice_file.last_count(path, 3) == 0
    notice_file.write(path, "3.7", "checkpoint", None)
    assert notice_file.last_count(path, 3) == 7
    assert notice_file.last_count(path, 4) == 0          # another attempt's notice


def test_the_status_table_marks_a_job_taken_over():
    now = int(time.time())
    res = {"daemon": {}, "rows": [table_row(name="a", state="running", pid=11, started=now, adopted=now),
                                  table_row(name="b", state="running", pid=12, started=now)]}
    lines = format_status(res).splitlines()
    assert lines[1].split()[2] == f"11{ADOPTED_MARK}" and lines[2].split()[2] == "12"
    assert lines[-1].startswith(f"{ADOPTED_MARK} taken over from an earlier daemon")
    res["rows"] = res["rows"][1:]
    assert "taken over" not in format_status(res)
