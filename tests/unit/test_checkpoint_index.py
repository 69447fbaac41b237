"""The ordered view of a checkpoint dir."""

import os
import shutil

import pytest
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.index import CheckpointDirError, best, latest_valid, order, scan


def test_order_dot_entries_and_unrecognised(tmp_path):
    for s in (30, 4, 100):
        write_checkpoint(tmp_path, s, {"x": b"1"}, metrics={"val_loss": 1 / s})
    (tmp_path / ".hidden.pt").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "step-12").mkdir()              # too few digits: not a checkpoint name
    listed = scan(tmp_path)
    # unrecognised names are listed as unmanaged (never deleted), before the checkpoints
    assert [(i.name, i.format) for i in listed if not i.managed] == [
        (".hidden.pt", "unmanaged"), ("notes.txt", "unmanaged"), ("step-12", "unmanaged")]
    infos = [i for i in listed if i.managed]
    assert [i.step for i in infos] == [4, 30, 100]
    assert all(i.path.is_absolute() and i.format == "trainsup" for i in infos)
    assert latest_valid(infos).step == 100
    assert best(infos, "val_loss", "min").step == 100 and best(infos, "val_loss", "max").step == 4


def test_in_progress_and_symlinks_listed_never_valid(tmp_path):
    write_checkpoint(tmp_path, 1, {"x": b"1"})
    tmp = tmp_path / ".trainsup-tmp" / "step-00000002.4242"
    tmp.mkdir(parents=True)
    (tmp / "x").write_bytes(b"12345")
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    shutil.copytree(tmp_path / "step-00000001", outside)
    os.symlink(outside, tmp_path / "step-00000009")
    os.symlink(outside / "x", tmp_path / "model_step_5.pt")
    infos = {i.name: i for i in scan(tmp_path)}
    ip = infos["step-00000002.4242"]
    assert ip.in_progress and not ip.valid and ip.pid == 4242 and ip.step == 2 and ip.bytes == 5
    for n in ("step-00000009", "model_step_5.pt"):
        assert not infos[n].valid and infos[n].invalid_reason == "symlink"
    assert latest_valid(list(infos.values())).name == "step-00000001"


def test_unnumbered_sorts_by_mtime_among_numbered(tmp_path):
    for n, t in (("step_3.pt", 300), ("step_1.pt", 100), ("latest.pt", 200), ("step_2.pt", 250)):
        p = tmp_path / n
        p.write_bytes(b"")
        os.utime(p, (t, t))
    assert [i.name for i in scan(tmp_path)] == ["step_1.pt", "latest.pt", "step_2.pt", "step_3.pt"]


def test_vanished_or_replaced_dir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointDirError, match="does not exist"):
        scan(tmp_path / "nope")
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(CheckpointDirError, match="symlink"):
        scan(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointDirError, match="not a directory"):
        scan(tmp_path / "file")


def test_bad_format_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        scan(tmp_path, fmt="tensorflow")


def test_format_restricts_what_is_seen(tmp_path):
    write_checkpoint(tmp_path, 1, {"x": b"1"})
    (tmp_path / "m_step_2.pt").write_bytes(b"")
    assert [i.name for i in scan(tmp_path, fmt="trainsup") if i.managed] == ["step-00000001"]
    assert [i.name for i in scan(tmp_path, fmt="torch") if i.managed] == ["m_step_2.pt"]


def test_order_is_stable_for_equal_steps():
    assert order([]) == []
