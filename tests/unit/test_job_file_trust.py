"""Whom a job file may run as, from who could have written it (config.files.JobsDirTrust):
a table over owners, modes, the jobs dir's safety and `user:`. Pure: stat results are built
here; the real files and users are in tests/integration/test_privilege_boundaries.py."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
from trainsup.config.files import JobsDirTrust, load_job_file
from trainsup.spec import JobSpec

ME = os.geteuid()
ALICE, BOB, TEAM = 4101, 4102, 4200


def _st(uid: int, mode: int, gid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> JobSpec:
    f = tmp_path_factory.mktemp("t") / "j.yaml"
    f.write_text("name: j\ncommand: [x]\n")
    job = load_job_file(f, is_root=False)
    assert isinstance(job, JobSpec)
    return job


def _as(spec: JobSpec, uid: int | None) -> JobSpec:
    return dataclasses.replace(spec, user=None if uid is None else f"u{uid}", uid=uid)


SAFE = JobsDirTrust(Path("/jobs"), None, frozenset({0, ME}), frozenset({0}))
TEAM_BOX = JobsDirTrust(Path("/jobs"), "it is writable by group 4200 (mode 2775)", frozenset({0, ME}), frozenset({0}))


@pytest.mark.parametrize("trust, st, runs_as, refused", [
    (SAFE, _st(0, 0o644), None, None),                        # root's file, safe dir: as it says
    (SAFE, _st(0, 0o644), ALICE, None),                       # ... any user: included
    (SAFE, _st(0, 0o664, gid=0), None, None),                 # group root may write: root's group
    (SAFE, _st(0, 0o666), None, "writable by others"),
    (SAFE, _st(0, 0o664, gid=TEAM), None, "writable by group 4200"),
    (SAFE, _st(ALICE, 0o644), None, "no `user:`"),            # would run as root
    (SAFE, _st(ALICE, 0o644), BOB, "runs only as its owner"),
    (SAFE, _st(ALICE, 0o644), ALICE, None),                   # her file, as her
    (TEAM_BOX, _st(ALICE, 0o644, gid=TEAM), ALICE, None),     # the drop box: her file, as her
    (TEAM_BOX, _st(ALICE, 0o664, gid=TEAM), ALICE, "writable by group 4200"),   # teammates could edit it
    (TEAM_BOX, _st(ALICE, 0o644, gid=TEAM), None, "no `user:`"),
    (TEAM_BOX, _st(0, 0o644), None, "others could have put this file there"),
    (TEAM_BOX, _st(0, 0o644), 0, "others could have put this file there"),     # `user: root` too
])
def test_who_a_job_file_may_run_as(spec, trust, st, runs_as, refused):
    why = trust.refuses(st, _as(spec, runs_as))
    assert (why is None) if refused is None else (refused in (why or "")), why
