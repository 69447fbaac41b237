"""Deletion never reaches outside the checkpoint dir: planted links, racers, crashes, owners."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.trash import TRASH_DIR, DeleteError, delete_entry, empty_trash


def _canary(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for n, data in (("a", b"precious-a"), ("sub/b", b"precious-b" * 100)):
        (root / n).write_bytes(data)
    return _snapshot(root)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_planted_symlinks_are_unlinked_not_followed(tmp_path):
    ck, canary = tmp_path / "ck", tmp_path / "canary"
    before = _canary(canary)
    write_checkpoint(ck, 1, {"x": b"1"})
    os.symlink(canary, ck / "step-00000002")             # a step-* dir that is a link
    os.symlink(canary / "a", ck / "model.pt")             # a file entry that is a link
    os.symlink(canary, ck / "step-00000001" / "inner")    # a link inside a real checkpoint
    for name in ("step-00000002", "model.pt", "step-00000001"):
        delete_entry(ck, name)
    assert _snapshot(canary) == before
    assert sorted(os.listdir(ck)) == [".trainsup-tmp", TRASH_DIR]
    assert os.listdir(ck / TRASH_DIR) == []


def test_refuses_names_outside_the_dir(tmp_path):
    for bad in ("..", "../x", "a/b", "", TRASH_DIR, ".trainsup-tmp/../x"):
        with pytest.raises(ValueError):
            delete_entry(tmp_path, bad)


def test_symlinked_ckpt_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    write_checkpoint(real, 1, {"x": b"1"})
    os.symlink(real, tmp_path / "link")
    with pytest.raises(DeleteError, match="symlink"):
        delete_entry(tmp_path / "link", "step-00000001")
    assert (real / "step-00000001" / "x").exists()


RACER = r"""
import os, sys
root, canary = sys.argv[1], sys.argv[2]
stop = os.path.join(root, "STOP")
swaps = 0
while not os.path.exists(stop):
    for dp, dns, fns in os.walk(root):
        for d in dns:
            if d.startswith("sub"):
                p = os.path.join(dp, d)
                try:
                    os.rename(p, p + ".moved")
                    os.symlink(canary, p)
                    swaps += 1
                except OSError:
                    pass
print(swaps)
"""


def test_racer_swapping_subdirs_for_links_never_reaches_canary(tmp_path):
    ck, canary = tmp_path / "ck", tmp_path / "canary"
    before = _canary(canary)
    ck.mkdir()
    racer = subprocess.Popen([sys.executable, "-c", RACER, str(ck), str(canary)], stdout=subprocess.PIPE)
    errors = 0
    try:
        for i in range(1000):
            # built outside the racer's reach, so only the deletion can meet a swapped link
            staged = tmp_path / "stage" / f"step-{i:08d}"
            for s in ("sub1", "sub2/sub3"):
                (staged / s).mkdir(parents=True)
                (staged / s / "f").write_bytes(b"x")
            e = ck / staged.name
            os.rename(staged, e)
            try:
                delete_entry(ck, e.name)
            except DeleteError:
                errors += 1  # gave up on a tree that kept changing: left in trash, never outside
    finally:
        (ck / "STOP").write_text("")
        out, _ = racer.communicate(timeout=60)
    empty_trash(ck)
    assert _snapshot(canary) == before
    assert int(out) > 0, "the racer never managed a swap: the test proved nothing"
    assert errors < 1000


def test_empty_trash_finishes_a_crashed_deletion(tmp_path):
    ck, canary = tmp_path / "ck", tmp_path / "canary"
    before = _canary(canary)
    half = ck / TRASH_DIR / "step-00000007.123.1"
    (half / "deep" / "er").mkdir(parents=True)
    (half / "deep" / "er" / "f").write_bytes(b"x")
    os.symlink(canary, half / "deep" / "link")
    empty_trash(ck)
    assert os.listdir(ck / TRASH_DIR) == []
    assert _snapshot(canary) == before
    (tmp_path / "fresh").mkdir()
    empty_trash(tmp_path / "fresh")  # no trash dir yet: nothing to do, no error


