"""The mirror's decisions (daemon/mirror/policy.py, layout.py): pure functions, table-tested."""

from __future__ import annotations

import pytest
from trainsup.daemon.mirror import layout, policy
from trainsup.daemon.mirror.policy import Candidate, LeaseView, LocalNewest


def key(step: int) -> str:
    return layout.entry_key(f"step-{step:08d}", step, 0.0)


def cands(*steps: int) -> list[Candidate]:
    return [Candidate(key(s), f"step-{s:08d}", s) for s in steps]


def test_uploads_in_step_order_only_what_remote_retention_would_keep():
    wanted = policy.uploads_wanted(cands(10, 20, 30, 40), remote=set(), keep=2)
    assert [c.step for c in wanted] == [30, 40]


def test_nothing_older_than_the_stores_newest_is_uploaded():
    wanted = policy.uploads_wanted(cands(10, 20, 30), remote={key(25)}, keep=5)
    assert [c.step for c in wanted] == [30]


def test_the_emergency_save_goes_ahead_of_the_queue():
    wanted = policy.uploads_wanted(cands(10, 20, 30), remote=set(), keep=5, first=key(30))
    assert [c.step for c in wanted] == [30, 10, 20]


@pytest.mark.parametrize("keys,keep,protect,doomed", [
    ([key(1), key(2), key(3)], 2, (), [key(1)]),
    ([key(1), key(2), key(3)], 0, (), [key(1), key(2)]),        # keep 0 is read as 1: never the newest
    ([key(3)], 1, (), []),
    ([key(1), key(2), key(3)], 1, (key(1),), [key(2)]),          # being restored: kept
    ([], 3, (), []),
])
def test_remote_retention_never_deletes_the_newest_complete_checkpoint(keys, keep, protect, doomed):
    assert policy.remote_doomed(keys, keep, protect) == doomed
    assert max(keys, default=None) not in policy.remote_doomed(keys, keep, protect)


@pytest.mark.parametrize("local,remote,mode,chosen", [
    (None, [(key(5), 5, 100.0)], "auto", key(5)),                       # a fresh machine
    (LocalNewest(5, 100.0), [(key(5), 5, 100.0)], "auto", None),        # as new locally
    (LocalNewest(3, 100.0), [(key(3), 3, 1.0), (key(5), 5, 2.0)], "auto", key(5)),
    (LocalNewest(9, 100.0), [(key(5), 5, 200.0)], "auto", None),        # local is newer
    (None, [(key(5), 5, 100.0)], "never", None),
    (None, [], "auto", None),
])
def test_restore_only_when_the_store_is_newer_than_the_local_dir(local, remote, mode, chosen):
    assert policy.restore_choice(local, remote, mode) == chosen


def test_lease_decisions():
    d = policy.lease_decision
    assert d("a", None, 0, 10).action == "take"
    assert d("a", LeaseView(3, "b", 4, False), 1, 10) == policy.LeaseDecision("wait", 3, "b")
    assert d("a", LeaseView(3, "b", 4, False), 10, 10) == policy.LeaseDecision("take", 4, "b")
    assert d("a", LeaseView(3, "b", 4, True), 0, 10).action == "take"          # released
    assert d("a", LeaseView(3, "a", 4, False), 0, 10, mine=3).action == "hold"
    assert d("a", LeaseView(4, "b", 0, False), 0, 10, mine=3) == policy.LeaseDecision("lost", 4, "b")


def test_expiry_is_a_whole_ttl_of_successful_reads_seeing_the_same_object():
    clock = policy.ExpiryClock()
    obj = (3, "b", 4, False)
    assert clock.observe(obj, 100.0) == 0.0
    assert clock.observe(obj, 105.0) == 5.0
    # the store failed (the holder's renewals failed too): the watch starts over
    clock.store_failed()
    assert clock.observe(obj, 200.0) == 0.0
    assert clock.observe(obj, 203.0) == 3.0
    assert clock.observe((3, "b", 5, False), 204.0) == 0.0      # renewed


@pytest.mark.parametrize("body", [
    b"{}", b"not json", b'{"format": "trainsup-mirror/1", "key": "K"}',
])
def test_a_commit_object_that_cannot_be_trusted_is_no_checkpoint(body):
    assert layout.parse_commit("K", body) is None


def test_a_commit_object_naming_a_path_outside_the_checkpoint_dir_is_refused():
    k = key(7)
    good = layout.RemoteEntry(k, "step-00000007", 7, (layout.RemoteFile("step-00000007/a", 1, "0" * 32),),
                              "step-00000007", 1.0, 2.0)
    assert layout.parse_commit(k, layout.commit_body(good)) == good
    for bad in ("../etc/passwd", "/etc/passwd", ".trainsup/x", "a/../../b"):
        evil = layout.RemoteEntry(k, "step-00000007", 7, (layout.RemoteFile(bad, 1, "0" * 32),),
                                  "step-00000007", 1.0, 2.0)
        assert layout.parse_commit(k, layout.commit_body(evil)) is None, bad
