"""SO_PEERCRED authorisation as a table (SPEC section 8)."""

import pytest

from trainsup.control import authorize

DAEMON_UID, GROUP = 1000, 500


@pytest.mark.parametrize("uid,groups,user,verb,job_user,allowed", [
    (0, {0}, "root", "stop", None, True),
    (DAEMON_UID, {1000}, "svc", "reload", None, True),
    (2000, {2000}, "eve", "status", None, False),            # not in the group: nothing
    (2000, {2000, GROUP}, "alice", "status", None, True),     # group member reads
    (2000, {2000, GROUP}, "alice", "logs", "bob", True),
    (2000, {2000, GROUP}, "alice", "stop", "bob", False),     # another user's job
    (2000, {2000, GROUP}, "alice", "stop", None, False),      # a job that runs as the daemon
    (2000, {2000, GROUP}, "alice", "stop", "alice", True),    # her own job
    (2000, {2000, GROUP}, "alice", "reload", None, False),
])
def test_authorize(uid, groups, user, verb, job_user, allowed):
    why = authorize(uid, groups, user, verb, job_user, daemon_uid=DAEMON_UID, socket_gid=GROUP)
    assert (why is None) is allowed
    if why:
        assert why.startswith("permission denied: ")


def test_without_socket_group_only_root_and_daemon_user():
    assert authorize(3000, {3000}, "x", "status", None, daemon_uid=DAEMON_UID, socket_gid=None)
