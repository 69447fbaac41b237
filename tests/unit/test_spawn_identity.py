"""A launch uses the ids the config resolved when it loaded: nothing on the spawn path
looks a user or group up (a slow NSS source, LDAP say, would block the daemon's loop at
every relaunch). Shown with an account that exists in no database at spawn time."""

from __future__ import annotations

from pathlib import Path

from trainsup.daemon.launch import process
from trainsup.spec import DaemonSpec, JobSpec


def _ghost(**kw) -> JobSpec:
    return JobSpec("g", ("/bin/true",), Path("/tmp"), Path("/tmp/g.yaml"), user="ghost-no-such-user",
                   uid=4242, gid=4343, home=Path("/home/ghost"), groups=(4343, 4444), shell="/bin/zsh", **kw)


def test_privilege_drop_and_env_from_the_resolved_spec():
    job = _ghost()
    assert process._privilege_drop(job) == {"user": 4242, "group": 4343, "extra_groups": [4343, 4444]}
    env = process.build_env(job, DaemonSpec(Path("/tmp"), Path("/tmp/s"), Path("/tmp/s.sock"), Path("/tmp")), {})
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"]) == \
        ("/home/ghost", "ghost-no-such-user", "ghost-no-such-user", "/bin/zsh")
    assert job.owner() == (4242, 4343)


def test_a_group_only_job_keeps_the_daemons_uid():
    import os
    job = JobSpec("g", ("/bin/true",), Path("/tmp"), Path("/tmp/g.yaml"), group="ghosts", gid=4343)
    assert process._privilege_drop(job) == {"group": 4343, "extra_groups": [4343]}
    assert job.owner() == (os.getuid(), 4343)
