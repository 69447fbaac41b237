"""What a daemon refuses at start, one line and exit 2 (issue 20).

Found: a second daemon with another state dir and the same socket path unlinked the live
daemon's socket and bound its own; when it exited, the first daemon (still running its
jobs) was unreachable. And `preemption.trigger_file` in a world-writable sticky dir let
any user preempt every job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import DaemonProc, scaled, wait_for
from trainsup.daemon.notices import Notice
from trainsup.daemon.notices.trigger import TriggerFile


def _refused(d: DaemonProc, *extra: str) -> str:
    d.start(*extra, wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 2, d.log_text()
    text = d.log_text()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("trainsup:")]
    assert len(lines) == 1, text
    return lines[0]


def test_second_daemon_with_another_state_dir_leaves_the_live_socket_alone(daemon, tmp_path):
    daemon.fakejob("keep", "--catch-usr1")
    daemon.start()
    pid = daemon.wait_state("keep", "running")["pid"]
    ino = os.stat(daemon.socket).st_ino
    second = DaemonProc(tmp_path / "second")
    second.socket = daemon.socket                    # the same socket, another state dir
    try:
        line = _refused(second)
        assert "another daemon is listening" in line and str(daemon.socket) in line, line
    finally:
        second.kill()
        if getattr(second, "out_f", None):
            second.out_f.close()
    assert os.stat(daemon.socket).st_ino == ino, "the live daemon's socket was replaced"
    st = daemon.status("keep")                       # still reachable, still supervising
    assert st["state"] == "running" and st["pid"] == pid


def test_stale_socket_of_a_dead_daemon_is_taken_over(daemon, tmp_path):
    daemon.start()
    daemon.proc.send_signal(signal.SIGKILL)          # dies without removing its socket
    daemon.proc.wait(10)
    assert daemon.socket.is_socket()
    second = DaemonProc(tmp_path / "second")
    second.socket = daemon.socket
    try:
        second.start()                                # nobody answers there: it is stale
        assert second.request("ping")["ok"]
    finally:
        second.terminate()
        if getattr(second, "out_f", None):
            second.out_f.close()


def test_trigger_file_in_world_writable_sticky_dir_refuses_to_start(daemon, tmp_path):
    """The way it was found: the trigger in a /tmp-like dir (1777): any user could
    create the file and preempt every job."""
    sticky = tmp_path / "shared-tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    cfg = tmp_path / "trainsup.yaml"
    cfg.write_text(f"preemption:\n  trigger_file: {sticky / 'preempt-now'}\n")
    daemon.fakejob("t1", "--catch-usr1")
    line = _refused(daemon, "--config", str(cfg))
    assert "writable by others" in line and str(sticky) in line and "trigger_file" in line, line
    assert not daemon.socket.exists()
    assert not daemon.records("t1"), "a job was started by a daemon that then refused to run"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_trigger_file_owned_by_another_user_is_ignored(tmp_path, caplog):
    """A file in the (checked) trigger dir that is not root's or the daemon's user's does
    not preempt anything; root's does. Real inotify, real files."""
    caplog.set_level(logging.WARNING, logger="trainsup")
    d = tmp_path / "trig"
    d.mkdir()
    seen: list[Notice] = []
    got = threading.Event()

    def on_notice(n: Notice) -> None:
        seen.append(n)
        got.set()
    t = TriggerFile(d / "preempt-now", on_notice)
    t.start()
    try:
        stage = d / "stage"
        stage.write_text("")
        os.chown(stage, 65534, 65534)                 # someone else's file, moved into place
        os.rename(stage, d / "preempt-now")
        # The watcher has looked at it (and said why it ignores it) before it goes: an event
        # read after root's file replaced it would rightly see root's file.
        wait_for(lambda: "not root or the daemon's user: ignored" in caplog.text, 10, "the foreign file to be judged")
        assert not seen, [n.detail for n in seen]
        os.unlink(d / "preempt-now")
        (d / "preempt-now").write_text("")            # root's
        assert got.wait(scaled(10)), "root's trigger file did not fire"
        assert [n.detail.rsplit(" ", 1)[-1] for n in seen] == ["created"], [n.detail for n in seen]
    finally:
        t.stop()


def test_trigger_dir_check_table(tmp_path):
    from trainsup.daemon.notices.trigger import TriggerRefused, prepare_trigger_dir
    ok = tmp_path / "ok"
    prepare_trigger_dir(ok / "f")                     # made if missing, and ours
    assert ok.is_dir()
    for mode in (0o777, 0o1777):
        bad = tmp_path / f"bad{mode:o}"
        bad.mkdir()
        bad.chmod(mode)
        with pytest.raises(TriggerRefused, match="writable by others"):
            prepare_trigger_dir(bad / "f")
    assert Path(tmp_path / "ok").exists()
