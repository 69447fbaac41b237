"""Validity verdicts: framework fixtures, corruption of each kind, the verdict cache."""

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import FRAMEWORK_FIXTURES
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.formats import FORMATS
from trainsup.checkpoint.formats import trainsup as trainsup_format
from trainsup.checkpoint.formats.common import MemoryVerdictCache
from trainsup.checkpoint.index import latest_valid, scan
from trainsup.checkpoint.validate import check_entry

FIXTURES = FRAMEWORK_FIXTURES


def _verdicts(d: Path) -> dict:
    return {i.name: (i.valid, i.invalid_reason) for i in scan(d)}


# ---------------------------------------------------------------- framework fixtures

GOOD = {
    "pytorch/good": ["checkpoint_epoch1.pth", "checkpoint_epoch2.pth", "checkpoint_epoch3.pth", "latest.pth"],
    "hf_trainer/good": ["checkpoint-2", "checkpoint-4", "checkpoint-6"],
    "lightning/good/lightning_logs/version_0/checkpoints": ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"],
    "lightning/interrupted_same_fs/lightning_logs/version_0/checkpoints":
        ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"],
}


@pytest.mark.parametrize("tree", sorted(GOOD))
def test_good_fixtures_are_valid(tree):
    v = _verdicts(FIXTURES / tree)
    assert sorted(v) == sorted(GOOD[tree])
    assert all(ok for ok, _ in v.values()), v


BAD = [
    # tree, broken entry, substrings of its reason, acceptable latest valid
    ("pytorch/interrupted", "checkpoint_epoch3.pth", ["no (complete) End-Of-Central-Directory"],
     {"latest.pth", "checkpoint_epoch2.pth"}),
    ("hf_trainer/interrupted", "checkpoint-6",
     ["missing trainer_state.json", "optimizer.pt: zip: no (complete) End-Of-Central-Directory"], {"checkpoint-4"}),
    ("hf_trainer/interrupted_in_safetensors_write", "checkpoint-6",
     ["missing trainer_state.json", "stray temp file .tmpN1MjRQ"], {"checkpoint-4"}),
    ("lightning/interrupted/lightning_logs/version_0/checkpoints", "epoch=2-step=12.ckpt",
     ["empty file (0 bytes)"], {"last.ckpt", "epoch=1-step=8.ckpt"}),
]


@pytest.mark.parametrize("tree,entry,why,fallback", BAD, ids=[b[0] for b in BAD])
def test_interrupted_fixtures_are_invalid_with_reason(tree, entry, why, fallback):
    infos = scan(FIXTURES / tree)
    bad = {i.name: i for i in infos}[entry]
    assert not bad.valid
    for w in why:
        assert w in bad.invalid_reason
    assert [i.name for i in infos if not i.valid] == [entry]
    # mtimes are not kept by git: either complete epoch-2 copy is an acceptable latest
    assert latest_valid(infos).name in fallback


# Paddle, TensorFlow, Keras, Lightning layouts and safetensors: tests/unit/test_formats_fixtures.py


def test_hf_metrics_come_from_log_history():
    infos = scan(FIXTURES / "hf_trainer/good")
    assert [i.step for i in infos] == [2, 4, 6]
    assert infos[-1].metrics["loss"] == pytest.approx(3.9085049629211426)


# ---------------------------------------------------------------- torch zips, built here

def _torch_like_zip(path: Path, n_members=4, size=5000) -> None:
    stem = path.stem
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{stem}/data.pkl", b"\x80\x02}q\x00.")
        for k in range(n_members):
            z.writestr(f"{stem}/data/{k}", bytes((k * 7 + j) % 256 for j in range(size)))
        z.writestr(f"{stem}/version", b"3\n")


def test_torch_zip_complete_is_valid(tmp_path):
    _torch_like_zip(tmp_path / "a.pt")
    assert check_entry(tmp_path / "a.pt", "torch").verdict.valid


@pytest.mark.parametrize("mutate,why", [
    (lambda b: b[: len(b) // 2], "no (complete) End-Of-Central-Directory"),
    (lambda b: b[:-1], "no (complete) End-Of-Central-Directory"),
    (lambda b: b[:10], "file too small"),
    (lambda b: b"", "empty file (0 bytes)"),
    (lambda b: b + b"\0" * 16, "does not end at file size"),
    (lambda b: b[:3000] + bytes([b[3000] ^ 0x10]) + b[3001:], "CRC mismatch in member a/data/0"),
    (lambda b: b"\x80\x02" + b[2:], "legacy torch format unsupported"),
])
def test_torch_zip_damage_is_named(tmp_path, mutate, why):
    p = tmp_path / "a.pt"
    _torch_like_zip(p)
    data = p.read_bytes()
    p.write_bytes(mutate(data))
    v = check_entry(p, "torch").verdict
    assert not v.valid and why in v.invalid_reason, v.invalid_reason


def test_local_header_must_match_central_directory(tmp_path):
    p = tmp_path / "a.pt"
    _torch_like_zip(p)
    data = bytearray(p.read_bytes())
    i = data.find(b"a/data/1")      # first occurrence: the local header's copy
    data[i + 7] = ord("9")
    p.write_bytes(bytes(data))
    v = check_entry(p, "torch").verdict
    assert not v.valid and "does not match the central directory" in v.invalid_reason


def _safetensors(tensors: dict) -> bytes:
    header, blobs, off = {}, b"", 0
    for name, raw in tensors.items():
        header[name] = {"dtype": "F32", "shape": [len(raw) // 4], "data_offsets": [off, off + len(raw)]}
        blobs += raw
        off += len(raw)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + blobs


def _hf_dir(root: Path, step=10) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir()
    (d / "model.safetensors").write_bytes(_safetensors({"w": b"\1" * 64, "b": b"\2" * 16}))
    _torch_like_zip(d / "optimizer.pt")
    (d / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "epoch": 1.0, "log_history": [{"step": step, "eval_loss": 0.5}]}))
    return d


def test_hf_dir_checks(tmp_path):
    d = _hf_dir(tmp_path)
    v = check_entry(d, "hf").verdict
    assert v.valid and v.step == 10 and v.metrics["eval_loss"] == 0.5
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-4])
    v = check_entry(d, "hf").verdict
    assert not v.valid and "model.safetensors: safetensors: header says data ends at" in v.invalid_reason
    _hf_dir(tmp_path, 12)
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 11}')
    v = check_entry(tmp_path / "checkpoint-12", "hf").verdict
    assert "global_step 11 != 12" in v.invalid_reason


# ---------------------------------------------------------------- trainsup

def _two(tmp_path):
    write_checkpoint(tmp_path, 1, {"a.bin": b"A" * 4096, "sub/b.bin": b"B" * 100}, metrics={"val_loss": 1.0})
    p = write_checkpoint(tmp_path, 2, {"a.bin": b"C" * 4096, "sub/b.bin": b"D" * 100})
    return p


def test_trainsup_valid_and_fields(tmp_path):
    _two(tmp_path)
    infos = scan(tmp_path)
    assert [(i.name, i.step, i.valid) for i in infos] == [("step-00000001", 1, True), ("step-00000002", 2, True)]
    assert infos[0].metrics == {"val_loss": 1.0} and infos[0].reason == "periodic"
    assert infos[0].bytes > 4196


def _flip(p: Path, at: int) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 1
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage,why", [
    (lambda p: (p / "a.bin").write_bytes(b"C" * 100), "a.bin: size 100 != manifest 4096"),
    (lambda p: _flip(p / "a.bin", 2000), "a.bin: xxh3_128 mismatch"),
    (lambda p: (p / "MANIFEST.json").unlink(), "no MANIFEST.json (not committed)"),
    (lambda p: (p / "MANIFEST.json").write_text("{"), "MANIFEST.json is not valid JSON"),
    (lambda p: (p / "sub" / "b.bin").unlink(), "missing sub/b.bin"),
    (lambda p: _edit_manifest(p, lambda m: m["files"]["a.bin"].update(size=4095)), "a.bin: size 4096 != manifest 4095"),
    (lambda p: _symlink_member(p), "a.bin: a symlink (never followed)"),
    (lambda p: _symlink_subdir(p), "sub/b.bin: a symlink (never followed)"),
])
def test_trainsup_damage_falls_back_to_previous(tmp_path, damage, why):
    p = _two(tmp_path)
    damage(p)
    infos = scan(tmp_path)
    assert infos[-1].name == "step-00000002" and not infos[-1].valid
    assert why in infos[-1].invalid_reason, infos[-1].invalid_reason
    assert latest_valid(infos).name == "step-00000001"


def _edit_manifest(p, fn):
    m = json.loads((p / "MANIFEST.json").read_text())
    fn(m)
    (p / "MANIFEST.json").write_text(json.dumps(m))


def _symlink_member(p):
    outside = p.parent / "outside.bin"
    outside.write_bytes((p / "a.bin").read_bytes())
    (p / "a.bin").unlink()
    os.symlink(outside, p / "a.bin")


def _symlink_subdir(p):
    os.rename(p / "sub", p.parent / "elsewhere")
    os.symlink(p.parent / "elsewhere", p / "sub")


def test_sha256_manifest(tmp_path):
    write_checkpoint(tmp_path, 5, {"x": b"hello"}, hash="sha256")
    assert scan(tmp_path)[0].valid


# ---------------------------------------------------------------- cache

def test_verdict_cache_hit_reads_nothing(tmp_path, monkeypatch):
    _two(tmp_path)
    cache = MemoryVerdictCache()
    first = scan(tmp_path, cache=cache)
    assert all(i.valid and not i.cached for i in first)

    def refuse(*a, **k):
        raise AssertionError("a cached verdict must not read file contents")
    for fmt in FORMATS.values():
        monkeypatch.setattr(fmt, "check", refuse)
    monkeypatch.setattr(trainsup_format, "hash_fd", refuse)
    again = scan(tmp_path, cache=cache)
    assert again == first and all(i.cached for i in again)


def test_verdict_cache_misses_after_change(tmp_path):
    p = _two(tmp_path)
    cache = MemoryVerdictCache()
    scan(tmp_path, cache=cache)
    _flip(p / "a.bin", 10)
    st = os.stat(p / "a.bin")
    os.utime(p / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime reset: ctime still moves
    infos = scan(tmp_path, cache=cache)
    assert not infos[-1].valid and not infos[-1].cached
