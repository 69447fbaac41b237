"""A damaged state database under a live daemon (SPEC section 11): it starts, keeps the
database aside, says so loudly, resumes the job from the newest valid checkpoint it finds on
disk, and deletes nothing but what the rotation policy itself chooses.

The StateDB-level corpus is tests/unit/test_state_db.py; this is the daemon around it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from _support import canaries_now, plant_canaries
from conftest import wait_for
from trainsup.checkpoint import write_checkpoint
from trainsup.daemon.state import StateDB


def _wrong_schema(p: Path) -> None:
    p.unlink()
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE jobs (x INTEGER)")
    c.commit()
    c.close()


DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:1500]),
    "random": lambda p: p.write_bytes(os.urandom(16384)),
    "wrong-schema": _wrong_schema,
}


def _seed_db(state: Path) -> None:
    db = StateDB(state)
    db.save_job("corpus", {"attempt": 7, "restarts": 6, "pinned": [2], "state": "running",
                           "pid": None, "pid_ctime": None})
    for i in range(100):
        db.add_event("corpus", "launch", {"attempt": i, "pad": "x" * 100})
    db.close()
    for suffix in ("-wal", "-shm"):
        (state / ("state.db" + suffix)).unlink(missing_ok=True)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_state_db_starts_fresh_and_deletes_only_by_policy(daemon, kind):
    root = daemon.root
    ck = root / "corpus-ckpt"
    canaries = plant_canaries(ck, root / "outside")
    # The job's first launch, long ago, found its dir empty: the inventory says so (a file
    # apart from the state DB, so it outlives the DB's damage). The canaries came later.
    from trainsup.checkpoint import inventory
    inventory.record_first_launch(daemon.state, "corpus", None, ck)
    for step in (10, 20, 30, 40):
        write_checkpoint(ck, step, {"state.json": b'{"step": %d}' % step})
    # Newer than every valid one but broken: never resumed from, and not the newest valid.
    (ck / "step-00000050").mkdir()
    (ck / "step-00000050" / "MANIFEST.json").write_text("{not json")
    _seed_db(daemon.state)
    DAMAGE[kind](daemon.state / "state.db")
    daemon.fakejob("corpus", "--catch-usr1", extra="  keep_last: 2\n  keep_best: 0\nstop_timeout: 2s\n")
    daemon.start()
    start = daemon.wait_ready("corpus")
    aside = list(daemon.state.glob("state.db.corrupt-*"))
    assert aside, f"{kind}: the damaged database was not kept aside"
    assert "STATE DATABASE" in daemon.log_text() and "CORRUPT" in daemon.log_text()
    assert start["resume"] == str(ck / "step-00000040"), start["resume"]
    assert start["attempt"] == "1"            # the counters began again, visibly
    wait_for(lambda: not (ck / "step-00000010").exists(), 20, "the rotation pass")
    daemon.request("stop", "corpus", no_save=True)
    deleted = {Path(e["path"]).name for e in daemon.history("corpus") if e["kind"] == "deleted"}
    present = {p.name for p in ck.iterdir() if p.name.startswith("step-")}
    # keep_last 2 keeps 30 and 40; the invalid 50 is newer than the newest valid: kept.
    assert {"step-00000030", "step-00000040", "step-00000050"} <= present, present
    assert deleted <= {"step-00000010", "step-00000020"}, deleted
    assert canaries_now(ck, root / "outside") == canaries
