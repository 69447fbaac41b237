"""DeepSpeed save_checkpoint folders (formats/deepspeed.py), on fixtures written by a real
ZeRO-2 run on 2 CPU ranks (tests/fixtures/make_sharded_fixtures.py): complete saves are
offered, one a rank was killed in is not, and rotation keeps the save `latest` names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from trainsup.checkpoint import formats
from trainsup.checkpoint.index import latest_valid, scan
from trainsup.checkpoint.rotation import plan_rotation
from trainsup.spec import CheckpointSpec

DS = REPO / "tests" / "fixtures" / "frameworks" / "deepspeed"


def _tree(tmp_path: Path, which: str = "good") -> Path:
    dst = tmp_path / which
    shutil.copytree(DS / which, dst)
    return dst


def _named(d: Path, fmt: str = "auto") -> dict:
    return {i.name: i for i in scan(d, fmt)}


@pytest.mark.parametrize("fmt", ["auto", "deepspeed"])
def test_deepspeed_saves_are_one_entry_each_and_latest_is_never_managed(tmp_path, fmt):
    d = _tree(tmp_path)
    infos = _named(d, fmt)
    for name, step in (("global_step4", 4), ("global_step8", 8)):
        i = infos[name]
        assert i.valid and i.format == "deepspeed" and i.step == step, i
        assert i.resume_path == d / name        # load_checkpoint(dirname, tag=basename)
    assert not infos["latest"].managed           # DeepSpeed's own pointer: never rotated
    assert latest_valid([i for i in infos.values() if i.managed]).name == "global_step8"


def test_deepspeed_rank_killed_inside_save_is_never_offered(tmp_path):
    d = _tree(tmp_path, "interrupted")
    cut = _named(d)["global_step12"]
    assert not cut.valid and cut.step == 12
    assert "newer than 'global_step8' that latest names" in cut.invalid_reason
    assert "missing the optimizer states of data-parallel rank(s) [0]" in cut.invalid_reason
    assert latest_valid([i for i in _named(d).values() if i.managed]).name == "global_step8"


def test_deepspeed_every_file_complete_but_latest_not_rewritten_is_not_committed(tmp_path):
    """Killed after the barrier, before rank 0 rewrote `latest`: load_checkpoint(save_dir)
    would load global_step4, so global_step8 is not offered either."""
    d = _tree(tmp_path)
    (d / "latest").write_text("global_step4")
    v = _named(d)["global_step8"]
    assert not v.valid and "newer than 'global_step4'" in v.invalid_reason, v


def test_deepspeed_latest_being_rewritten_does_not_invalidate(tmp_path):
    d = _tree(tmp_path)
    (d / "latest").write_text("")            # open('w') truncates before the tag is written
    assert _named(d)["global_step8"].valid


@pytest.mark.parametrize("damage, why", [
    (lambda d: os.truncate(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt", 3000), "zero_pp_rank_1_mp_rank_00"),
    (lambda d: (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(), "data-parallel rank(s) [1]"),
    (lambda d: (d / "mp_rank_00_model_states.pt").unlink(), "no mp_rank_*_model_states.pt"),
])
def test_deepspeed_damaged_save_is_invalid_with_the_reason(tmp_path, damage, why):
    d = _tree(tmp_path)
    damage(d / "global_step8")
    v = _named(d)["global_step8"]
    assert not v.valid and why in v.invalid_reason, v.invalid_reason


def test_deepspeed_rotation_keeps_the_save_latest_names(tmp_path):
    """keep_last 1 and a quota smaller than one save: the save `latest` names is kept (so
    load_checkpoint(save_dir) finds it), the older one goes."""
    d = _tree(tmp_path)
    infos = [i for i in scan(d) if i.managed]
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pinned = formats.protected_steps(fd, infos)
    finally:
        os.close(fd)
    assert pinned == {8}
    plan = plan_rotation(infos, CheckpointSpec(dir=str(d), keep_last=1, quota=1000), pinned=pinned, live=set())
    assert [i.name for i in plan.delete] == ["global_step4"], plan.reasons
    assert plan.kept[d / "global_step8"] in ("newest", "pinned")
