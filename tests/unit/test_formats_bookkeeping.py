"""Rotation that keeps each framework's bookkeeping working: HF's best checkpoint, TF's
state file, multi-file entries deleted member by member, commit marker first."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import FRAMEWORK_FIXTURES
from trainsup.checkpoint.deleter import delete_unit, deletion_units
from trainsup.checkpoint.formats.hf import protected_steps as hf_best_steps
from trainsup.checkpoint.formats.tf_state import forget_in_tf_state, tf_state_without
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.rotation import plan_rotation
from trainsup.spec import CheckpointSpec

FIXTURES = FRAMEWORK_FIXTURES

STATE = """model_checkpoint_path: "ckpt-3"
all_model_checkpoint_paths: "ckpt-1"
all_model_checkpoint_paths: "ckpt-2"
all_model_checkpoint_paths: "ckpt-3"
all_model_checkpoint_timestamps: 1795373118.5413196
all_model_checkpoint_timestamps: 1795373118.6019058
all_model_checkpoint_timestamps: 1795373118.6565797
last_preserved_timestamp: 1795373117.277199
"""


def test_tf_state_drops_a_deleted_checkpoint_with_its_timestamp():
    out = tf_state_without(STATE, ["ckpt-1"])
    assert out == ('model_checkpoint_path: "ckpt-3"\n'
                   'all_model_checkpoint_paths: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-3"\n'
                   "all_model_checkpoint_timestamps: 1795373118.6019058\n"
                   "all_model_checkpoint_timestamps: 1795373118.6565797\n"
                   "last_preserved_timestamp: 1795373117.277199\n")
    assert tf_state_without(STATE, ["ckpt-9"]) is None          # not listed: left alone


def test_tf_state_latest_moves_to_the_newest_remaining():
    out = tf_state_without(STATE, ["ckpt-3"])
    assert out.startswith('model_checkpoint_path: "ckpt-2"\n') and '"ckpt-3"' not in out


def test_tf_state_rewrite_is_a_rename(tmp_path):
    (tmp_path / "checkpoint").write_text(STATE)
    ino = (tmp_path / "checkpoint").stat().st_ino
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert forget_in_tf_state(fd, ["ckpt-1"])
    finally:
        os.close(fd)
    assert (tmp_path / "checkpoint").stat().st_ino != ino      # readers see old or new, never half
    assert '"ckpt-1"' not in (tmp_path / "checkpoint").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def _copy(tree: str, dst: Path) -> Path:
    shutil.copytree(FIXTURES / tree, dst)
    for d, _dirs, files in os.walk(dst):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return dst


def test_hf_best_model_checkpoint_is_protected_like_a_pin(tmp_path):
    d = _copy("hf_trainer/good", tmp_path / "out")
    state = json.loads((d / "checkpoint-6/trainer_state.json").read_text())
    state["best_model_checkpoint"] = str(d / "checkpoint-2")
    (d / "checkpoint-6/trainer_state.json").write_text(json.dumps(state))
    infos = scan(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        best = hf_best_steps(fd, infos)
    finally:
        os.close(fd)
    assert best == {2}
    plan = plan_rotation(infos, CheckpointSpec(dir=d, keep_last=1), pinned=best)
    assert [i.name for i in plan.delete] == ["checkpoint-4"]
    assert plan.kept[d / "checkpoint-2"] == "pinned"


def test_multi_file_entries_delete_member_by_member_commit_marker_first(tmp_path):
    d = _copy("paddle/good", tmp_path / "out")
    info = {i.name: i for i in scan(d)}["iter_epoch_1"]
    assert deletion_units(info, d) == ["iter_epoch_1.states", "iter_epoch_1.pdparams", "iter_epoch_1.pdopt"]
    for rel in deletion_units(info, d):
        delete_unit(d, rel)
    assert "iter_epoch_1" not in {i.name for i in scan(d)}
    assert not list(d.glob("iter_epoch_1.*"))


def test_nested_members_are_deleted_without_following_a_symlinked_dir(tmp_path):
    d = _copy("lightning/good", tmp_path / "out")
    rel = "lightning_logs/version_0/checkpoints/epoch=1-step=8.ckpt"
    delete_unit(d, rel)
    assert not (d / rel).exists()
    # the same layout reached through a symlinked dir: refused, the target untouched
    outside = _copy("lightning/good", tmp_path / "elsewhere")
    shutil.rmtree(d / "lightning_logs")
    os.symlink(outside / "lightning_logs", d / "lightning_logs")
    with pytest.raises(OSError, match="never followed"):
        delete_unit(d, "lightning_logs/version_0/checkpoints/epoch=2-step=12.ckpt")
    assert (outside / "lightning_logs/version_0/checkpoints/epoch=2-step=12.ckpt").exists()


LV = "lightning_logs/version_0/checkpoints/"


@pytest.mark.parametrize("tree,keep_last,kept,deleted", [
    # numbered checkpoints only count; latest / best_accuracy / best_model / last / backup stay
    ("paddle/good", 2, {"iter_epoch_2", "iter_epoch_3", "latest", "best_accuracy", "best_model/model"},
     {"iter_epoch_1"}),
    ("lightning/good", 2, {LV + "epoch=1-step=8.ckpt", LV + "epoch=2-step=12.ckpt", LV + "last.ckpt"}, set()),
    ("keras/good", 4, {"ckpt_weights/epoch02.weights.h5", "ckpt_weights/epoch03.weights.h5",
                       "ckpt_keras/epoch02.keras", "ckpt_keras/epoch03.keras", "backup/latest.weights.h5"},
     {"ckpt_weights/epoch01.weights.h5", "ckpt_keras/epoch01.keras"}),
])
def test_aliases_are_kept_and_not_counted_for_keep_last(tmp_path, tree, keep_last, kept, deleted):
    d = _copy(tree, tmp_path / "out")
    infos = scan(d)
    plan = plan_rotation(infos, CheckpointSpec(dir=d, keep_last=keep_last))
    assert {i.name for i in plan.delete} == deleted
    assert {i.name for i in infos if i.path in plan.kept} == kept


def test_tf_state_forgets_names_whose_files_are_gone_and_leaves_other_paths(tmp_path):
    """CheckpointManager rewrites the state file from memory at its next save, listing again
    what rotation deleted: every pass drops the names with no `.index` in the dir. An
    absolute path may name a checkpoint elsewhere: never touched."""
    from trainsup.checkpoint.formats.tf_state import forget_missing

    (tmp_path / "checkpoint").write_text(STATE.replace('all_model_checkpoint_paths: "ckpt-1"',
                                                       'all_model_checkpoint_paths: "/elsewhere/ckpt-0"\n'
                                                       'all_model_checkpoint_paths: "ckpt-1"'))
    (tmp_path / "ckpt-3.index").write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert forget_missing(fd) == ["ckpt-1", "ckpt-2"]
        assert forget_missing(fd) == []                   # nothing left to drop: no rewrite
    finally:
        os.close(fd)
    text = (tmp_path / "checkpoint").read_text()
    assert '"ckpt-1"' not in text and '"ckpt-2"' not in text
    assert 'model_checkpoint_path: "ckpt-3"' in text and '"/elsewhere/ckpt-0"' in text


def _lightning_ckpt(path: Path, step: int, callbacks: dict) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"epoch": 0, "global_step": step, "state_dict": {"w": torch.zeros(4)},
                "callbacks": callbacks, "optimizer_states": [{"state": {}}]}, path)


def test_lightning_model_checkpoint_state_is_protected_by_path(tmp_path):
    """The newest .ckpt's ModelCheckpoint state names its best k (here the oldest saves,
    mode min) and best_model_path: rotation keeps them, read from the pickle's opcodes."""
    torch = pytest.importorskip("torch")
    from trainsup.checkpoint.formats import bookkeeping

    names = [f"epoch=0-step={s}.ckpt" for s in (3, 6, 9, 12, 15)]
    best = {str(tmp_path / n): torch.tensor(float(s)) for n, s in zip(names[:3], (3, 6, 9))}
    state = {"monitor": "step", "best_model_score": torch.tensor(3.0), "best_model_path": str(tmp_path / names[0]),
             "best_k_models": best, "kth_best_model_path": str(tmp_path / names[2]), "last_model_path": "",
             "dirpath": str(tmp_path)}
    for n, s in zip(names, (3, 6, 9, 12, 15)):
        _lightning_ckpt(tmp_path / n, s, {"ModelCheckpoint{'monitor': 'step', 'mode': 'min'}": state})
    infos = scan(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pins, kept = bookkeeping(fd, infos)
    finally:
        os.close(fd)
    assert pins == {tmp_path / names[0]}, pins                     # best_model_path: a pin
    assert kept == {tmp_path / n for n in names[1:3]}, kept        # the rest of the best k
    spec = CheckpointSpec(dir=str(tmp_path), keep_last=2)
    plan = plan_rotation(infos, spec, pinned=pins, framework_kept=kept)
    assert [Path(i.path).name for i in plan.delete] == [], plan
    spec = CheckpointSpec(dir=str(tmp_path), keep_last=1)
    plan = plan_rotation(infos, spec, pinned=pins, framework_kept=kept)
    assert [Path(i.path).name for i in plan.delete] == [names[3]], plan
    # under quota pressure the best k goes before keep_last; best_model_path never
    plan = plan_rotation(infos, CheckpointSpec(dir=str(tmp_path), keep_last=2), pinned=pins, framework_kept=kept,
                         quota=1)
    assert [Path(i.path).name for i in plan.delete] == [names[1], names[2], names[3]], plan
    assert "the framework's own best k relaxed" in plan.reasons[tmp_path / names[1]]
    assert plan.kept[tmp_path / names[0]] == "pinned" and plan.over_quota


def test_lightning_state_read_never_unpickles_and_a_broken_pickle_protects_nothing(tmp_path):
    import pickle

    from trainsup.checkpoint.formats.lightning import model_checkpoint_paths
    from trainsup.checkpoint.formats.readers.pickle_values import OPAQUE, NotPlain, plain_values

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    data = pickle.dumps({"callbacks": {"ModelCheckpoint{}": {"best_model_path": "/d/a.ckpt", "x": Boom(),
                                                             "best_k_models": {"/d/b.ckpt": Boom()}}}})
    v = plain_values(data)
    assert v["callbacks"]["ModelCheckpoint{}"]["x"] is OPAQUE
    assert model_checkpoint_paths(v) == ({"/d/a.ckpt"}, {"/d/b.ckpt"})
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(NotPlain):
        plain_values(data[: len(data) // 2])


def test_tf_state_tidy_ignores_a_fifo_planted_as_the_state_file(tmp_path):
    """Every rotation pass reads the state file on a daemon worker: a FIFO under its name
    (a hostile job) must not block it."""
    from trainsup.checkpoint.formats.tf_state import forget_missing

    os.mkfifo(tmp_path / "checkpoint")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert forget_missing(fd) == []
    finally:
        os.close(fd)


def test_tf_state_file_written_after_a_restore_only_where_there_is_none(tmp_path):
    """A TF dir restored on a fresh machine gets a state file naming the restored prefix
    (what tf.train.latest_checkpoint reads: checked by hand with tensorflow 2.21, which
    returned <dir>/ckpt-3); TF's own file, or anything under its name, is left alone."""
    from trainsup.checkpoint.formats.tf_state import write_state_if_absent

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert write_state_if_absent(fd, "ckpt-3")
        assert (tmp_path / "checkpoint").read_text() == (
            'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
        (tmp_path / "checkpoint").write_text(STATE)
        assert not write_state_if_absent(fd, "ckpt-9")
        assert (tmp_path / "checkpoint").read_text() == STATE
        assert not write_state_if_absent(fd, "../x")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]      # no temp file left
