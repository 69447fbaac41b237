"""Every framework fixture (tests/fixtures/frameworks, written by the real frameworks and
killed mid-save by a real SIGKILL): good entries valid with the right step, interrupted ones
invalid with the precise reason, multi-file checkpoints one entry, aliases named.

mtimes are not kept by git, so nothing here depends on them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import FRAMEWORK_FIXTURES
from trainsup.checkpoint.formats.common import MemoryVerdictCache
from trainsup.checkpoint.index import latest_valid
from trainsup.checkpoint.index import scan as scan_all


def scan(*args, **kwargs):
    """The checkpoint entries of a dir: what the format names (the index also lists every
    other name as `unmanaged`, never deleted: that is the deletion tests' business)."""
    return [i for i in scan_all(*args, **kwargs) if i.managed]

FIXTURES = FRAMEWORK_FIXTURES

LV = "lightning_logs/version_0/checkpoints/"

# tree -> {entry name: (step, alias_of)}; every entry valid
GOOD = {
    "paddle/good": {
        "iter_epoch_1": (4, None), "iter_epoch_2": (8, None), "iter_epoch_3": (12, None),
        "latest": (12, "iter_epoch_3"), "best_accuracy": (12, "iter_epoch_3"), "best_model/model": (None, None),
    },
    "tensorflow/good": {"ckpt-1": (1, None), "ckpt-2": (2, None), "ckpt-3": (3, None)},
    "keras/good": {
        "ckpt_weights/epoch01.weights.h5": (1, None), "ckpt_weights/epoch02.weights.h5": (2, None),
        "ckpt_weights/epoch03.weights.h5": (3, None), "ckpt_keras/epoch01.keras": (1, None),
        "ckpt_keras/epoch02.keras": (2, None), "ckpt_keras/epoch03.keras": (3, None),
        "backup/latest.weights.h5": (3, "ckpt_weights/epoch03.weights.h5"),
    },
    "lightning/good": {
        LV + "epoch=1-step=8.ckpt": (8, None), LV + "epoch=2-step=12.ckpt": (12, None),
        LV + "last.ckpt": (12, LV + "epoch=2-step=12.ckpt"),
    },
    "lightning/interrupted_same_fs": {
        LV + "epoch=0-step=4.ckpt": (4, None), LV + "epoch=1-step=8.ckpt": (8, None),
        LV + "last.ckpt": (8, LV + "epoch=1-step=8.ckpt"),
    },
}

# tree, broken entry, its step, substrings of its reason, entries acceptable as the latest valid
BAD = [
    ("paddle/interrupted", "latest", 8,
     ["latest.pdparams: empty file (0 bytes)",
      "latest.pdopt is from step 12 (Adam beta1 power", "latest.states says global_step 8"],
     {"best_accuracy"}),
    ("paddle/interrupted_synthetic_truncation", "iter_epoch_3", 12,
     ["missing iter_epoch_3.pdparams", "iter_epoch_3.pdopt: pickle: opcode stream broken",
      "missing iter_epoch_3.states (commit marker"],
     {"latest", "best_accuracy"}),
    ("tensorflow/interrupted", "ckpt-3", 3,
     ["ckpt-3 not listed in the 'checkpoint' state file", "ckpt-3_temp/: leftover temp dir",
      "ckpt-3.index: empty file (0 bytes)"],
     {"ckpt-2"}),
    ("tensorflow/interrupted_synthetic_truncation", "ckpt-3", 3,
     ["tf-data: ", "of shard 0, shard has 15445"], {"ckpt-2"}),
    ("keras/interrupted", "ckpt_weights/epoch03.weights.h5", 3,
     ["hdf5: superblock consistency flags=0x1", "end-of-file address 2048 != actual size 20680"],
     {"ckpt_keras/epoch02.keras", "ckpt_weights/epoch02.weights.h5", "backup/latest.weights.h5"}),
    ("keras/interrupted_in_backup_write", "backup/latest.weights.h5", 2,
     ["latest.weights.h5: hdf5: superblock consistency flags=0x1",
      "end-of-file address 2048 != actual size 96 (file truncated)"],
     {"ckpt_weights/epoch03.weights.h5", "ckpt_keras/epoch03.keras"}),
    ("lightning/interrupted", LV + "epoch=2-step=12.ckpt", 12, ["empty file (0 bytes)"],
     {LV + "epoch=1-step=8.ckpt", LV + "last.ckpt"}),
]


@pytest.mark.parametrize("tree", sorted(GOOD))
def test_every_good_fixture_entry_is_valid_with_its_step(tree):
    infos = scan(FIXTURES / tree)
    got = {i.name: (i.step, i.alias_of) for i in infos}
    assert got == GOOD[tree]
    assert all(i.valid for i in infos), [(i.name, i.invalid_reason) for i in infos if not i.valid]


@pytest.mark.parametrize("tree,entry,step,why,fallback", BAD, ids=[b[0] for b in BAD])
def test_every_interrupted_fixture_entry_is_invalid_with_a_precise_reason(tree, entry, step, why, fallback):
    infos = scan(FIXTURES / tree)
    bad = {i.name: i for i in infos}[entry]
    assert not bad.valid and bad.step == step
    for w in why:
        assert w in bad.invalid_reason, bad.invalid_reason
    assert [i.name for i in infos if not i.valid] == [entry]
    assert latest_valid(infos).name in fallback


def test_lightning_orphan_in_tmpdir_is_not_a_checkpoint_dir():
    # the complete temp file Lightning left in $TMPDIR: no layout anyone resumes from
    assert scan(FIXTURES / "lightning/interrupted_TMPDIR_orphan") == []


@pytest.mark.parametrize("tree,fmt", [
    ("paddle/good", "paddle"), ("tensorflow/good", "tf"), ("keras/good", "keras"), ("lightning/good", "lightning"),
])
def test_each_format_selectable_by_name(tree, fmt):
    auto = {(i.name, i.step, i.valid) for i in scan(FIXTURES / tree)}
    named = scan(FIXTURES / tree, fmt)
    assert {(i.name, i.step, i.valid) for i in named} == auto
    assert {i.format for i in named} == {fmt}
    others = {"paddle", "tf", "keras", "lightning", "safetensors"} - {fmt}
    for other in others:
        assert scan(FIXTURES / tree, other) == [], other


def test_multi_file_checkpoints_are_one_entry_with_all_their_bytes():
    root = FIXTURES / "paddle/good"
    latest = {i.name: i for i in scan(root)}["latest"]
    assert latest.members == ("latest.states", "latest.pdparams", "latest.pdopt")
    assert latest.bytes == sum((root / m).stat().st_size for m in latest.members)
    root = FIXTURES / "tensorflow/interrupted"
    ck = {i.name: i for i in scan(root)}["ckpt-3"]
    assert ck.members[0] == "ckpt-3.index"   # commit marker first: deleted first
    assert set(ck.members) == {"ckpt-3.index", "ckpt-3.data-00000-of-00001", "ckpt-3_temp"}


@pytest.mark.parametrize("tree,name,resume", [
    ("paddle/good", "latest", "latest"),                 # -o Global.checkpoints=<prefix>
    ("tensorflow/good", "ckpt-3", "ckpt-3"),             # ckpt.restore(<prefix>)
    ("keras/good", "backup/latest.weights.h5", "backup/latest.weights.h5"),
    ("keras/good", "ckpt_keras/epoch03.keras", "ckpt_keras/epoch03.keras"),
    ("lightning/good", LV + "last.ckpt", LV + "last.ckpt"),
    ("hf_trainer/good", "checkpoint-6", "checkpoint-6"),
])
def test_resume_path_is_what_the_framework_resume_call_takes(tree, name, resume):
    info = {i.name: i for i in scan(FIXTURES / tree)}[name]
    assert info.resume_path == FIXTURES / tree / resume


def _copy(tree: str, tmp_path: Path) -> Path:
    dst = tmp_path / tree.replace("/", "_")
    shutil.copytree(FIXTURES / tree, dst, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(dst):
        for n in dirnames + filenames:
            os.chmod(os.path.join(dirpath, n), 0o755 if n in dirnames else 0o644)
    os.chmod(dst, 0o755)
    return dst


def test_lightning_save_last_link_is_an_alias_of_its_sibling(tmp_path):
    d = _copy("lightning/good", tmp_path)
    ck = d / LV
    (ck / "last.ckpt").unlink()
    os.symlink("epoch=2-step=12.ckpt", ck / "last.ckpt")
    infos = {i.name: i for i in scan(d)}
    last = infos[LV + "last.ckpt"]
    assert last.valid and last.step == 12 and last.alias_of == LV + "epoch=2-step=12.ckpt"
    assert last.path == ck / "last.ckpt"                       # the link is the entry...
    assert last.resume_path == ck / "epoch=2-step=12.ckpt"     # ...the file is what resumes


def test_lightning_link_leaving_the_dir_is_never_followed(tmp_path):
    d = _copy("lightning/good", tmp_path)
    ck = d / LV
    outside = tmp_path / "outside.ckpt"
    shutil.copy(ck / "last.ckpt", outside)
    (ck / "last.ckpt").unlink()
    os.symlink(str(outside), ck / "last.ckpt")
    last = {i.name: i for i in scan(d)}[LV + "last.ckpt"]
    assert not last.valid and "never followed" in last.invalid_reason
    assert last.alias_kind == "last"   # named as the framework's alias, so rotation can leave it


def test_lightning_checkpoints_of_every_version_are_found(tmp_path):
    # a resumed run writes into version_1; one that crashed before its first save must not
    # hide version_0's checkpoints
    d = _copy("lightning/good", tmp_path)
    (d / "lightning_logs/version_1/checkpoints").mkdir(parents=True)
    names = [i.name for i in scan(d)]
    assert names[-1] == LV + "epoch=2-step=12.ckpt" and len(names) == 3


def test_cached_recheck_reads_nothing_and_a_state_file_rewrite_is_seen(tmp_path):
    d = _copy("tensorflow/good", tmp_path)
    cache = MemoryVerdictCache()
    assert all(i.valid and not i.cached for i in scan(d, cache=cache))
    assert all(i.valid and i.cached for i in scan(d, cache=cache))
    # TF's state file is the commit marker: a rewrite that drops ckpt-3 uncommits it
    state = (d / "checkpoint").read_text().replace('model_checkpoint_path: "ckpt-3"', 'model_checkpoint_path: "ckpt-2"')
    state = "\n".join(line for line in state.splitlines() if '"ckpt-3"' not in line)
    tmp = d / "checkpoint.tmp"
    tmp.write_text(state)
    os.replace(tmp, d / "checkpoint")
    ck3 = {i.name: i for i in scan(d, cache=cache)}["ckpt-3"]
    assert not ck3.valid and "not listed in the 'checkpoint' state file" in ck3.invalid_reason


def test_index_and_data_bit_flips_are_caught_by_crc32c(tmp_path):
    d = _copy("tensorflow/good", tmp_path)
    for name, want in (("ckpt-2.index", "tf-index: data block CRC32C mismatch"),
                       ("ckpt-3.data-00000-of-00001", "tf-data: CRC32C mismatch for")):
        p = d / name
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x10
        p.write_bytes(bytes(b))
        bad = {i.name: i for i in scan(d)}[name.split(".")[0]]
        assert not bad.valid and want in bad.invalid_reason


@pytest.mark.parametrize("rel,cut", [
    ("latest.pdparams", 1), ("latest.pdparams", 0.5), ("latest.pdopt", -1), ("latest.states", -1),
])
def test_paddle_truncation_anywhere_is_caught(tmp_path, rel, cut):
    d = _copy("paddle/good", tmp_path)
    p = d / rel
    size = p.stat().st_size
    keep = cut if isinstance(cut, int) and cut >= 0 else (size - 1 if cut == -1 else int(size * cut))
    os.truncate(p, keep)
    latest = {i.name: i for i in scan(d)}["latest"]
    assert not latest.valid and f"{rel}: " in latest.invalid_reason and "pickle" in latest.invalid_reason


def test_keras_zip_cut_short_is_caught(tmp_path):
    d = _copy("keras/good", tmp_path)
    p = d / "ckpt_keras/epoch03.keras"
    os.truncate(p, p.stat().st_size - 1)
    bad = {i.name: i for i in scan(d)}["ckpt_keras/epoch03.keras"]
    assert not bad.valid and "End-Of-Central-Directory" in bad.invalid_reason


def test_backup_metadata_is_the_commit_marker(tmp_path):
    d = _copy("keras/good", tmp_path)
    (d / "backup/training_metadata.json").write_text('{"epoch": 3, "ba')
    bad = {i.name: i for i in scan(d)}["backup/latest.weights.h5"]
    assert not bad.valid and "training_metadata.json: not valid JSON" in bad.invalid_reason
    (d / "backup/training_metadata.json").unlink()
    bad = {i.name: i for i in scan(d)}["backup/latest.weights.h5"]
    # killed between the weights and the metadata of the first backup: not committed
    assert not bad.valid and bad.alias_kind == "backup"
    assert "training_metadata.json: missing (commit marker" in bad.invalid_reason
