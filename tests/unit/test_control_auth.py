"""SO_PEERCRED authorisation as a table (SPEC section 8), over targets resolved from the
request's arguments (issue 10: `preempt` with `all` once authorised only the named job)."""

import pytest
from trainsup.control.server import authorize
from trainsup.control.verbs import VERBS, RequestError, resolve_targets

DAEMON_UID, GROUP, ALICE, BOB = 1000, 500, 2000, 2001
OWNERS = {"a1": ALICE, "a2": ALICE, "b1": BOB, "svc": None}    # None: runs as the daemon


def _check(uid, groups, cmd, job=None, **args):
    verb = VERBS[cmd]
    targets = resolve_targets(verb, job, args, lambda: list(OWNERS))
    return authorize(uid, groups, verb, targets, OWNERS.get, daemon_uid=DAEMON_UID, socket_gid=GROUP)


@pytest.mark.parametrize("uid,groups,cmd,job,args,allowed", [
    (0, {0}, "stop", "b1", {}, True),
    (DAEMON_UID, {1000}, "reload", None, {}, True),
    (3000, {3000}, "status", None, {}, False),                 # not in the group: nothing
    (ALICE, {ALICE, GROUP}, "status", None, {}, True),         # group member reads
    (ALICE, {ALICE, GROUP}, "logs", "b1", {}, True),
    (ALICE, {ALICE, GROUP}, "stop", "b1", {}, False),          # another user's job
    (ALICE, {ALICE, GROUP}, "stop", "svc", {}, False),         # a job that runs as the daemon
    (ALICE, {ALICE, GROUP}, "stop", "a1", {}, True),           # her own job
    (ALICE, {ALICE, GROUP}, "stop", "nosuch", {}, False),
    (ALICE, {ALICE, GROUP}, "reload", None, {}, False),
    (ALICE, {ALICE, GROUP}, "preempt", "a1", {}, True),
    (ALICE, {ALICE, GROUP}, "preempt", None, {"all": True}, False),   # all = bob's and the daemon's too
    (0, {0}, "preempt", None, {"all": True}, True),
])
def test_authorize(uid, groups, cmd, job, args, allowed):
    why = _check(uid, groups, cmd, job, **args)
    assert (why is None) is allowed, why
    if why:
        assert why.startswith("permission denied: ")


def test_preempt_all_resolves_to_every_job_and_names_one_it_may_not_touch():
    verb = VERBS["preempt"]
    assert resolve_targets(verb, None, {"all": True}, lambda: ["b", "a"]) == ("a", "b")
    why = _check(ALICE, {ALICE, GROUP}, "preempt", None, all=True)
    assert "b1" in why or "svc" in why


def test_a_job_and_all_together_is_a_bad_request():
    with pytest.raises(RequestError):
        resolve_targets(VERBS["preempt"], "a1", {"all": True}, lambda: list(OWNERS))


def test_without_socket_group_only_root_and_daemon_user():
    verb = VERBS["status"]
    assert authorize(3000, {3000}, verb, (), OWNERS.get, daemon_uid=DAEMON_UID, socket_gid=None)


def test_every_verb_needs_a_target_rule_and_writers_are_explicit():
    for verb in VERBS.values():
        assert verb.targets in ("none", "daemon", "job", "job?", "job|all"), verb.name
    assert {v.name for v in VERBS.values() if not v.writes} == {"ping", "status", "logs", "checkpoints", "history"}


def test_client_trusts_only_root_itself_and_the_configured_daemon_user(tmp_path):
    """The socket-owner check of the client (the kernel's SO_PEERCRED check follows it)."""
    import os
    import pwd
    import socket as so

    from trainsup.config.files import load_daemon_config
    from trainsup.control.client import Unreachable, check_server, trusted_uids

    if os.geteuid() != 0:
        pytest.skip("needs root to chown the socket")
    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "trainsup.sock"
    s = so.socket(so.AF_UNIX)
    s.bind(str(path))
    os.chown(path, nobody.pw_uid, -1)
    with pytest.raises(Unreachable, match="owned by uid"):
        check_server(path, trusted_uids())
    config = tmp_path / "trainsup.yaml"
    config.write_text("user: nobody\n")
    spec = load_daemon_config(config, {}, is_root=True)
    assert spec.uid == nobody.pw_uid
    check_server(path, trusted_uids([spec.uid]))
    s.close()


@pytest.mark.parametrize("mode,uid,gid,unsafe", [
    (0o755, 0, 0, None),
    (0o750, 0, 500, None),
    (0o777, 0, 0, "writable by others"),
    (0o1777, 0, 0, "writable by others"),
    (0o775, 0, 500, "writable by group 500"),
    (0o775, 0, 0, None),
    (0o755, 4242, 0, "owned by uid 4242"),
])
def test_socket_dir_safety_table(mode, uid, gid, unsafe):
    import os
    import stat as st

    from trainsup.control.protocol import unsafe_dir
    fake = os.stat_result((st.S_IFDIR | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))
    why = unsafe_dir(fake, {0, 1000}, {0, 1000})
    assert (why is None) if unsafe is None else (unsafe in why), why
