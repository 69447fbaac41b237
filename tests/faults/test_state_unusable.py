"""A state dir that cannot be written is not a corrupt database (issue 10).

Found: ENOSPC on the state filesystem at start made a healthy database look corrupt; it was
moved aside and pins, counters, stopped states and history were lost. A read-only state dir
gave a traceback. Now: nothing moves unless SQLite says the file is corrupt, and a state dir
the daemon cannot use is one line and exit 2. Real mounts (tmpfs, read-only bind): needs root.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from trainsup.daemon.state import StateDB

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")


@contextmanager
def mounted(*args: str, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _seed(state: Path) -> None:
    db = StateDB(state)
    db.save_job("keeper", {"attempt": 7, "restarts": 6, "pinned": [2], "state": "stopped",
                           "pid": None, "pid_ctime": None})
    for i in range(40):
        db.add_event("keeper", "launch", {"attempt": i})
    db.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fill(fs: Path) -> Path:
    """Write until the filesystem is full (ENOSPC), then free one page: the daemon's
    lock file gets it (as it did when the defect was found) and SQLite finds no room."""
    spare = fs / "spare"
    spare.write_bytes(b"\0" * 4096)
    filler = fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    spare.unlink()
    return filler


def _one_line_error(text: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("trainsup:")]
    assert len(lines) == 1, text
    return lines[0]


def test_enospc_at_start_keeps_the_healthy_state_db(daemon, tmp_path):
    statefs = tmp_path / "statefs"
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=statefs):
        daemon.state = statefs / "state"
        _seed(daemon.state)
        daemon.fakejob("keeper", "--catch-usr1", ckpt=False)
        filler = _fill(statefs)
        daemon.start(wait=False)
        try:
            rc = daemon.proc.wait(30)          # refusing to start is fine...
            assert rc == 2, daemon.log_text()
            _one_line_error(daemon.log_text())
        except subprocess.TimeoutExpired:
            daemon.terminate()                 # ...and so is running with writes failing
        assert not list(daemon.state.glob("state.db.corrupt-*")), "a healthy database was moved aside"
        filler.unlink()                        # space returns
        daemon.start()
        assert daemon.status("keeper")["state"] == "stopped"
        launches = [e for e in daemon.history("keeper") if e["kind"] == "launch"]
        assert len(launches) == 40
        assert daemon.terminate() == 0
        db = StateDB(daemon.state)
        saved = db.load_job("keeper")
        db.close()
        assert saved["attempt"] == 7 and saved["restarts"] == 6 and saved["pinned"] == [2], saved
        assert not list(daemon.state.glob("state.db.corrupt-*"))


def test_read_only_state_dir_at_start_is_one_line_and_exit_2(daemon, tmp_path):
    _seed(daemon.state)
    before = _digest(daemon.state / "state.db")
    names = sorted(p.name for p in daemon.state.iterdir())
    daemon.fakejob("keeper", "--catch-usr1", ckpt=False)
    with mounted("--bind", str(daemon.state), target=daemon.state):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(daemon.state)], check=True)
        daemon.start(wait=False)
        assert daemon.proc.wait(30) == 2, daemon.log_text()
        line = _one_line_error(daemon.log_text())
        assert str(daemon.state) in line and "read-only" in line.lower(), line
    assert _digest(daemon.state / "state.db") == before
    assert sorted(p.name for p in daemon.state.iterdir()) == names
