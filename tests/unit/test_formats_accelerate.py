"""HF Accelerate save_state folders (formats/accelerate.py), on fixtures written by a real
2-process run with automatic checkpoint naming (tests/fixtures/make_sharded_fixtures.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from trainsup.checkpoint.deleter import delete_one
from trainsup.checkpoint.dirhandle import DirHandle
from trainsup.checkpoint.index import latest_valid, scan

ACC = REPO / "tests" / "fixtures" / "frameworks" / "accelerate"
C = "checkpoints/"


def _tree(tmp_path: Path, which: str = "good") -> Path:
    dst = tmp_path / which
    shutil.copytree(ACC / which, dst)
    return dst


def _named(d: Path, fmt: str = "auto") -> dict:
    return {i.name: i for i in scan(d, fmt) if i.managed}


@pytest.mark.parametrize("fmt", ["auto", "accelerate"])
def test_accelerate_saves_are_one_entry_each_numbered_by_the_save(tmp_path, fmt):
    d = _tree(tmp_path)
    infos = _named(d, fmt)
    assert sorted(infos) == [C + "checkpoint_0", C + "checkpoint_1"], infos
    for n in (0, 1):
        i = infos[f"{C}checkpoint_{n}"]
        assert i.valid and i.format == "accelerate" and i.step == n, i
        assert i.resume_path == d / "checkpoints" / f"checkpoint_{n}"      # load_state(input_dir)
    assert "checkpoints" not in {i.name for i in scan(d) if not i.managed}


def test_accelerate_save_killed_before_its_registered_objects_is_never_offered(tmp_path):
    d = _tree(tmp_path, "interrupted")
    infos = _named(d)
    cut = infos[C + "checkpoint_2"]
    assert not cut.valid and "missing custom_checkpoint_0.pkl that the save before it has" in cut.invalid_reason
    assert latest_valid(list(infos.values())).name == C + "checkpoint_1"


@pytest.mark.parametrize("damage, why", [
    (lambda d: os.truncate(d / "optimizer.bin", 100), "optimizer.bin: "),
    (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors: "),
    (lambda d: (d / "random_states_0.pkl").unlink(), "missing random_states_0.pkl"),
    (lambda d: (d / "scheduler.bin").unlink(), "missing scheduler.bin that the save before it has"),
])
def test_accelerate_damaged_save_is_invalid_with_the_reason(tmp_path, damage, why):
    d = _tree(tmp_path)
    damage(d / "checkpoints" / "checkpoint_1")
    v = _named(d)[C + "checkpoint_1"]
    assert not v.valid and why in v.invalid_reason, v.invalid_reason


def test_accelerate_rotation_leaves_nothing_of_ours_in_the_checkpoints_folder(tmp_path):
    """Accelerate's total_limit pruning parses a number from every name in checkpoints/
    (a `.trainsup-trash` there raised IndexError in save_state): deletions go through the
    checkpoint dir's own trash."""
    d = _tree(tmp_path)
    old = _named(d)[C + "checkpoint_0"]
    with DirHandle.open(d) as h:
        out = delete_one(h, old)
    assert out.ok, out
    assert sorted(os.listdir(d / "checkpoints")) == ["checkpoint_1"]
    assert _named(d)[C + "checkpoint_1"].valid


def test_nested_deletion_never_follows_a_swapped_in_symlink_nor_leaves_the_dir(tmp_path):
    """The root-trash deletion opens the parent beneath the held dir: a `checkpoints`
    swapped for a symlink to a victim dir, or a `..` in the names, deletes nothing."""
    from trainsup.checkpoint.trash import DeleteError, delete_nested

    d = _tree(tmp_path)
    victim = tmp_path / "victim"
    (victim / "checkpoint_0").mkdir(parents=True)
    (victim / "checkpoint_0" / "precious").write_text("keep")
    os.rename(d / "checkpoints", d / "real")
    os.symlink(victim, d / "checkpoints")
    with DirHandle.open(d) as h:
        with pytest.raises((DeleteError, OSError)):
            delete_nested(h, "checkpoints", "checkpoint_0")
        for parent, name in (("..", "victim"), ("real", ".."), (".trainsup-trash", "x"), ("real/../..", "victim")):
            with pytest.raises(ValueError):
                delete_nested(h, parent, name)
    assert (victim / "checkpoint_0" / "precious").read_text() == "keep"
    assert (d / "real" / "checkpoint_0").is_dir()
