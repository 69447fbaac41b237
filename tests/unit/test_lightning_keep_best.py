"""Issue 12, Deliver 5: Lightning's best checkpoint survives rotation while keep_best applies.

ModelCheckpoint(filename="{epoch}-{step}-{val_loss:.2f}") puts the monitored metric in the
file name; the daemon never unpickles, so keep_best ranks Lightning entries by that name.
The files are real torch.save zips, as Lightning writes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainsup.checkpoint.formats.lightning import metrics_from_name
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.rotation import plan_rotation
from trainsup.spec import CheckpointSpec

LV = "lightning_logs/version_0/checkpoints"


def _lightning_dir(root: Path, names: list[tuple[int, str]]) -> Path:
    d = root / LV
    d.mkdir(parents=True)
    for step, name in names:
        torch.save({"epoch": step // 4, "global_step": step, "state_dict": {"w": torch.zeros(4)}}, d / name)
    return root


@pytest.mark.parametrize("name,metrics", [
    ("epoch=1-step=8-val_loss=0.31.ckpt", {"val_loss": 0.31}),
    ("epoch=1-step=8-val_loss=-0.31-v1.ckpt", {"val_loss": -0.31}),   # name clash suffix, negative value
    ("epoch=0-step=4-val_loss=1e-05-val_acc=0.90.ckpt", {"val_loss": 1e-05, "val_acc": 0.9}),
    ("epoch=1-step=8.ckpt", {}),
    ("last.ckpt", {}),
])
def test_lightning_metrics_come_from_the_name(name, metrics):
    assert metrics_from_name(name) == metrics


def test_lightning_best_checkpoint_is_not_deleted_while_keep_best_applies(tmp_path):
    root = _lightning_dir(tmp_path / "out", [
        (4, "epoch=0-step=4-val_loss=0.50.ckpt"),
        (8, "epoch=1-step=8-val_loss=0.31.ckpt"),      # the best
        (12, "epoch=2-step=12-val_loss=0.44.ckpt"),
        (16, "epoch=3-step=16-val_loss=0.47.ckpt"),
    ])
    infos = scan(root)
    assert [(i.step, dict(i.metrics)) for i in infos] == [
        (4, {"val_loss": 0.5}), (8, {"val_loss": 0.31}), (12, {"val_loss": 0.44}), (16, {"val_loss": 0.47})]
    plan = plan_rotation(infos, CheckpointSpec(dir=root, keep_last=1, keep_best=1, metric="val_loss"))
    assert {i.step for i in plan.delete} == {4, 12}
    assert plan.kept[root / LV / "epoch=1-step=8-val_loss=0.31.ckpt"] == "best"
    assert plan.kept[root / LV / "epoch=3-step=16-val_loss=0.47.ckpt"] in ("last", "newest")


def test_lightning_keep_best_max_mode_keeps_the_highest(tmp_path):
    root = _lightning_dir(tmp_path / "out", [
        (4, "epoch=0-step=4-val_acc=0.91.ckpt"),       # the best when higher is better
        (8, "epoch=1-step=8-val_acc=0.60.ckpt"),
        (12, "epoch=2-step=12-val_acc=0.70.ckpt"),
    ])
    plan = plan_rotation(scan(root), CheckpointSpec(dir=root, keep_last=1, keep_best=1,
                                                    metric="val_acc", mode="max"))
    assert {i.step for i in plan.delete} == {8}
