"""SO_PEERCRED authorisation as a table (SPEC section 8), over targets resolved from the
request's arguments (issue 10: `preempt` with `all` once authorised only the named job)."""

import pytest

from trainsup.control import authorize
from trainsup.verbs import VERBS, RequestError, resolve_targets

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
