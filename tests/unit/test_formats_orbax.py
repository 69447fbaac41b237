"""Orbax CheckpointManager step folders (formats/orbax.py), on fixtures written by a real JAX
run with async saves (tests/fixtures/make_sharded_fixtures.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from trainsup.checkpoint.formats.common import MemoryVerdictCache
from trainsup.checkpoint.index import latest_valid, scan

ORBAX = REPO / "tests" / "fixtures" / "frameworks" / "orbax"


def _tree(tmp_path: Path, which: str = "good") -> Path:
    dst = tmp_path / which
    shutil.copytree(ORBAX / which, dst)
    return dst


def _named(d: Path, fmt: str = "auto", cache=None) -> dict:
    return {i.name: i for i in scan(d, fmt, cache) if i.managed}


@pytest.mark.parametrize("fmt", ["auto", "orbax"])
def test_orbax_step_folders_are_one_entry_each(tmp_path, fmt):
    d = _tree(tmp_path)
    infos = _named(d, fmt)
    assert sorted(infos) == ["4", "8"], infos
    for n in (4, 8):
        i = infos[str(n)]
        assert i.valid and i.format == "orbax" and i.step == n, i
        assert i.resume_path == d / str(n)           # mngr.restore(int(basename))
    assert latest_valid(list(infos.values())).name == "8"


def test_orbax_async_save_killed_before_its_rename_is_never_offered(tmp_path):
    d = _tree(tmp_path, "interrupted")
    infos = _named(d)
    cut = infos["12.orbax-checkpoint-tmp"]
    assert not cut.valid and cut.step == 12 and "tmp folder" in cut.invalid_reason
    assert latest_valid(list(infos.values())).name == "8"


def _first_data_file(step: Path) -> Path:
    return sorted((step / "default" / "ocdbt.process_0" / "d").iterdir())[0]


@pytest.mark.parametrize("damage, why", [
    (lambda s: (s / "commit_success.txt").unlink(), "missing commit_success.txt"),
    (lambda s: (s / "_CHECKPOINT_METADATA").write_text(json.dumps({"item_handlers": {"default": "x"}})),
     "no commit_timestamp_nsecs"),
    (lambda s: shutil.rmtree(s / "default"), "missing the item folder default/"),
    (lambda s: os.truncate(s / "default" / "manifest.ocdbt", 50), "manifest.ocdbt: says"),
    (lambda s: os.truncate(_first_data_file(s), 40), "(cut short)"),
    (lambda s: _flip_last_byte(_first_data_file(s)), "CRC32C mismatch"),
    (lambda s: (s / "default" / "_METADATA").write_text("{"), "_METADATA: not valid JSON"),
])
def test_orbax_damaged_step_is_invalid_with_the_reason(tmp_path, damage, why):
    d = _tree(tmp_path)
    damage(d / "8")
    v = _named(d)["8"]
    assert not v.valid and why in v.invalid_reason, v.invalid_reason
    assert _named(d)["4"].valid


def _flip_last_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-1] ^= 0xFF
    p.write_bytes(bytes(b))


def test_orbax_file_rewritten_deep_inside_after_a_cached_verdict_is_seen(tmp_path):
    """The verdict cache covers files three folders down (an in-place change there moves
    no mtime of the step folder)."""
    d = _tree(tmp_path)
    cache = MemoryVerdictCache()
    assert _named(d, cache=cache)["8"].valid
    assert _named(d, cache=cache)["8"].cached
    _flip_last_byte(_first_data_file(d / "8"))
    v = _named(d, cache=cache)["8"]
    assert not v.valid and not v.cached
