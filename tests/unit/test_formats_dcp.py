"""PyTorch Distributed Checkpoint folders (formats/dcp.py), on fixtures written by real FSDP2
saves on 2 ranks (tests/fixtures/make_sharded_fixtures.py): what is offered for resume,
what is not and why, whatever a killed save or a hostile file left."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from trainsup.checkpoint.formats.common import MemoryVerdictCache
from trainsup.checkpoint.index import latest_valid, scan

DCP = REPO / "tests" / "fixtures" / "frameworks" / "dcp"


def _tree(tmp_path: Path, which: str = "good") -> Path:
    dst = tmp_path / which
    shutil.copytree(DCP / which, dst)
    return dst


def _named(d: Path, fmt: str = "auto", cache=None) -> dict:
    return {i.name: i for i in scan(d, fmt, cache) if i.managed}


@pytest.mark.parametrize("fmt", ["auto", "dcp"])
def test_dcp_saves_are_one_entry_each_with_their_step_and_resume_dir(tmp_path, fmt):
    d = _tree(tmp_path)
    infos = _named(d, fmt)
    assert sorted(infos) == ["step_4", "step_8"], infos
    for name, step in (("step_4", 4), ("step_8", 8)):
        i = infos[name]
        assert i.valid and i.format == "dcp" and i.step == step, i
        assert i.resume_path == d / name                      # what dcp.load(checkpoint_id=) takes
        assert i.bytes == sum(f.stat().st_size for f in (d / name).iterdir())
    assert latest_valid(list(infos.values())).name == "step_8"


def test_dcp_async_save_killed_between_staging_and_commit_is_never_offered(tmp_path):
    d = _tree(tmp_path, "interrupted")
    infos = _named(d)
    cut = infos["step_12"]
    assert not cut.valid and cut.step == 12
    assert "missing .metadata (not committed" in cut.invalid_reason and "2 shard file(s)" in cut.invalid_reason
    assert latest_valid(list(infos.values())).name == "step_8"


def test_dcp_killed_after_writing_its_metadata_tmp_is_not_committed(tmp_path):
    d = _tree(tmp_path)
    os.rename(d / "step_8" / ".metadata", d / "step_8" / ".metadata.tmp")
    v = _named(d)["step_8"]
    assert not v.valid and "killed while committing" in v.invalid_reason, v


@pytest.mark.parametrize("cut, why", [
    (lambda p: os.truncate(p, p.stat().st_size - 100), "cut short"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 64), "64 bytes after the last item"),
    (lambda p: p.unlink(), "missing step_8/__1_0.distcp"),
    (lambda p: os.truncate(p, 0), "cut short"),
])
def test_dcp_shard_damaged_after_the_commit_is_invalid_with_the_reason(tmp_path, cut, why):
    d = _tree(tmp_path)
    cut(d / "step_8" / "__1_0.distcp")
    v = _named(d)["step_8"]
    assert not v.valid and why in v.invalid_reason, v.invalid_reason
    assert _named(d)["step_4"].valid


def test_dcp_item_overwritten_in_place_is_not_a_torch_zip(tmp_path):
    d = _tree(tmp_path)
    p = d / "step_8" / "__0_0.distcp"
    data = bytearray(p.read_bytes())
    data[-22:-18] = b"XXXX"              # the last item's end-of-central-directory
    p.write_bytes(bytes(data))
    v = _named(d)["step_8"]
    assert not v.valid and "not a complete torch.save zip" in v.invalid_reason


def test_dcp_truncated_in_place_after_a_cached_valid_verdict_is_seen(tmp_path):
    """The cache key covers every file of the folder (not only the folder's own mtime,
    which an in-place truncation does not move)."""
    d = _tree(tmp_path)
    cache = MemoryVerdictCache()
    assert _named(d, cache=cache)["step_8"].valid
    assert _named(d, cache=cache)["step_8"].cached
    with open(d / "step_8" / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    v = _named(d, cache=cache)["step_8"]
    assert not v.valid and not v.cached, v


def test_dcp_metadata_of_a_rank_missing_is_caught(tmp_path):
    """A .metadata that lists only rank 0's chunks (rank 1's shards gone from it)."""
    d = _tree(tmp_path)
    data = (d / "step_8" / ".metadata").read_bytes()
    (d / "step_8" / ".metadata").write_bytes(data.replace(b"__1_0.distcp", b"__0_0.distcp"))
    v = _named(d)["step_8"]
    assert not v.valid, v


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_hostile_metadata_runs_nothing_and_is_invalid(tmp_path):
    d = _tree(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    (d / "step_8" / ".metadata").write_bytes(pickle.dumps({"storage_data": evil}))
    v = _named(d)["step_8"]
    assert not v.valid and "not a DCP Metadata record" in v.invalid_reason
    assert not marker.exists(), "the daemon executed a global named by a checkpoint"


def test_dcp_metadata_naming_a_file_outside_the_folder_is_invalid(tmp_path):
    d = _tree(tmp_path)
    data = (d / "step_8" / ".metadata").read_bytes()
    evil = data.replace(b"\x8c\x0c__1_0.distcp", b"\x8c\x0c../step_4/.x")
    assert evil != data
    (d / "step_8" / ".metadata").write_bytes(evil)
    v = _named(d)["step_8"]
    assert not v.valid and "not a file name inside the checkpoint" in v.invalid_reason, v.invalid_reason


def test_dcp_folders_other_formats_own_stay_theirs(tmp_path):
    """HF Trainer with FSDP writes a DCP inside checkpoint-N/ (trainer_state.json is its
    marker); a DCP saved into a folder named checkpoint-N without it is DCP's."""
    d = tmp_path / "d"
    d.mkdir()
    shutil.copytree(DCP / "good" / "step_8", d / "checkpoint-8")
    shutil.copytree(DCP / "good" / "step_4", d / "checkpoint-4" / "pytorch_model_fsdp_0")
    (d / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    infos = _named(d)
    assert infos["checkpoint-8"].format == "dcp" and infos["checkpoint-8"].valid, infos["checkpoint-8"]
    assert infos["checkpoint-4"].format == "hf", infos["checkpoint-4"]
