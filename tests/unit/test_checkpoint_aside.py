"""Which entries go aside before a relaunch (checkpoint/aside.py): only proven-broken
framework entries newer than the newest valid one."""

from __future__ import annotations

from pathlib import Path

from trainsup.checkpoint.aside import interrupted
from trainsup.checkpoint.index import CheckpointInfo


def ck(name: str, step, valid: bool, fmt: str = "hf", **kw) -> CheckpointInfo:
    return CheckpointInfo(Path("/ck") / name, name, fmt, step, 10, valid,
                          None if valid else "truncated", **kw)


def names(infos) -> list[str]:
    return [i.name for i in infos]


def test_only_broken_entries_newer_than_the_newest_valid():
    infos = [ck("checkpoint-2", 2, True), ck("checkpoint-3", 3, False), ck("checkpoint-4", 4, True),
             ck("checkpoint-6", 6, False)]
    assert names(interrupted(infos)) == ["checkpoint-6"]       # checkpoint-3 is rotation's


def test_nothing_valid_means_every_broken_entry():
    assert names(interrupted([ck("checkpoint-2", 2, False), ck("checkpoint-4", 4, False)])) == \
        ["checkpoint-2", "checkpoint-4"]


def test_never_unknown_aliases_pinned_trainsup_unmanaged_or_in_progress():
    infos = [ck("checkpoint-2", 2, True),
             ck("checkpoint-5", 5, False, unknown=True),                  # could not be read
             ck("latest", 5, False, fmt="paddle", alias_kind="latest"),   # the framework rewrites it
             ck("checkpoint-7", 7, False),                                # pinned below
             ck("step-00000008", 8, False, fmt="trainsup"),               # the daemon names resume
             ck("notes.txt", None, False, fmt="unmanaged", managed=False),
             ck("step-00000009.123", 9, False, fmt="trainsup", in_progress=True)]
    assert interrupted(infos, pinned={7}) == []
