"""The byte-level checks behind the framework formats, on files built here."""

from __future__ import annotations

import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import pytest
from trainsup.checkpoint.formats.common import Invalid as _Invalid
from trainsup.checkpoint.formats.readers.hdf5 import SIGNATURE, check_hdf5_fd, lookup3
from trainsup.checkpoint.formats.readers.pickle_stream import check_pickle_fd
from trainsup.checkpoint.index import scan


def _check_pickle(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        check_pickle_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_walk_never_executes_the_stream(tmp_path):
    marker = tmp_path / "executed"
    p = tmp_path / "evil.pdparams"
    p.write_bytes(pickle.dumps({"w": _Boom(str(marker))}, protocol=4))
    _check_pickle(p)
    assert not marker.exists()


def test_pickle_walk_memory_is_bounded_by_its_window(tmp_path):
    p = tmp_path / "big.pdparams"
    p.write_bytes(pickle.dumps({"w": b"\0" * (64 << 20)}, protocol=4))
    tracemalloc.start()
    try:
        _check_pickle(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"walk of a 64 MiB payload peaked at {peak} bytes"


@pytest.mark.parametrize("protocol,mutation,why", [
    (4, lambda b: b[:-1], "frame at byte"),                        # the last frame is cut
    (2, lambda b: b[:-1], "pickle exhausted before seeing STOP"),  # no frames: STOP missing
    (4, lambda b: b[: len(b) // 2], "opcode stream broken"),
    (2, lambda b: b[: len(b) // 2], "opcode stream broken"),
    (4, lambda b: b + b"\0" * 16, "(trailing data)"),
    (4, lambda b: b"", "empty file (0 bytes)"),
    (4, lambda b: b"\xff" + b[1:], "unknown opcode 0xff at byte 0"),
])
def test_pickle_walk_catches_every_prefix_and_suffix(tmp_path, protocol, mutation, why):
    p = tmp_path / "x.pdparams"
    p.write_bytes(mutation(pickle.dumps({"w": b"\1" * 100000, "n": list(range(50))}, protocol=protocol)))
    with pytest.raises(_Invalid, match=None) as e:
        _check_pickle(p)
    assert why in str(e.value)


def test_lookup3_matches_jenkins_reference_vectors():
    # from lookup3.c's driver5(): hashlittle("", 0) and the "Four score" sentence
    assert lookup3(b"", 0) == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago", 0) == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161


def _superblock_v2(eof: int, flags: int = 0) -> bytes:
    body = SIGNATURE + bytes([2, 8, 8, flags]) + struct.pack("<QQQQ", 0, 0xFFFFFFFFFFFFFFFF, eof, 48)
    return body + struct.pack("<I", lookup3(body))


def _check_h5(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        check_hdf5_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_hdf5_v2_superblock_checksum_flags_and_eof(tmp_path):
    p = tmp_path / "m.weights.h5"
    p.write_bytes(_superblock_v2(512).ljust(512, b"\0"))
    _check_h5(p)
    b = bytearray(p.read_bytes())
    b[30] ^= 1                                  # inside the base address: checksum breaks
    p.write_bytes(bytes(b))
    with pytest.raises(_Invalid, match="superblock checksum mismatch"):
        _check_h5(p)
    p.write_bytes(_superblock_v2(512, flags=1).ljust(512, b"\0"))
    with pytest.raises(_Invalid, match="consistency flags=0x1"):
        _check_h5(p)
    p.write_bytes(_superblock_v2(4096).ljust(512, b"\0"))
    with pytest.raises(_Invalid, match=r"end-of-file address 4096 != actual size 512 \(file truncated\)"):
        _check_h5(p)


def _paddle_group(d: Path, prefix: str, opt_power: float, global_step: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{prefix}.pdopt").write_bytes(pickle.dumps(
        {"linear_0.w_0_moment1_0": b"\0" * 64, "linear_0.w_0_beta1_pow_acc_0": struct.pack("<f", opt_power)},
        protocol=4))
    (d / f"{prefix}.pdparams").write_bytes(pickle.dumps({"linear_0.w_0": b"\0" * 64}, protocol=4))
    (d / f"{prefix}.states").write_bytes(pickle.dumps(
        {"best_model_dict": {}, "epoch": 1, "global_step": global_step}, protocol=2))


def test_paddle_adam_cross_check_accepts_a_non_default_beta1(tmp_path):
    _paddle_group(tmp_path, "latest", 0.95 ** 21, 20)     # beta1=0.95, 20 steps: consistent
    (info,) = scan(tmp_path)
    assert info.valid and info.step == 20


def test_paddle_stale_states_next_to_newer_pdopt_is_invalid(tmp_path):
    _paddle_group(tmp_path, "latest", 0.9 ** 31, 20)      # .pdopt from step 30, .states from 20
    (info,) = scan(tmp_path)
    assert not info.valid and "latest.pdopt is from step 30" in info.invalid_reason


def test_paddle_states_with_a_global_is_refused_not_imported(tmp_path):
    _paddle_group(tmp_path, "latest", 0.9 ** 21, 20)
    marker = tmp_path / "executed"
    (tmp_path / "latest.states").write_bytes(pickle.dumps({"global_step": _Boom(str(marker))}, protocol=2))
    (info,) = scan(tmp_path)
    assert not marker.exists()
    assert not info.valid and "refused global posix.mkdir" in info.invalid_reason


def _safetensors(tensors: dict[str, bytes]) -> bytes:
    header, off = {}, 0
    for k, v in tensors.items():
        header[k] = {"dtype": "U8", "shape": [len(v)], "data_offsets": [off, off + len(v)]}
        off += len(v)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(tensors.values())


def test_standalone_safetensors_header_and_size(tmp_path):
    (tmp_path / "model-00100.safetensors").write_bytes(_safetensors({"w": b"\1" * 64}))
    cut = _safetensors({"w": b"\1" * 64})[:-3]
    (tmp_path / "model-00200.safetensors").write_bytes(cut)
    infos = scan(tmp_path)
    assert [(i.name, i.step, i.valid) for i in infos] == [
        ("model-00100.safetensors", 100, True), ("model-00200.safetensors", 200, False)]
    assert "header says data ends at" in infos[1].invalid_reason
    assert {i.format for i in infos} == {"safetensors"}


def test_auto_claims_numbered_saves_and_aliases_never_exports(tmp_path):
    st = _safetensors({"w": b"\1" * 64})
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "resnet50.safetensors",
                 "step_300.safetensors"):
        (tmp_path / name).write_bytes(st)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(st)
    infos = scan(tmp_path)
    assert [i.name for i in infos if i.format == "safetensors"] == ["step_300.safetensors"]
    assert all(not i.managed for i in infos if i.format != "safetensors")   # listed, never deleted
    # named explicitly, the format claims every file of its kind at the top and one level down
    assert len([i for i in scan(tmp_path, "safetensors") if i.format == "safetensors"]) == 5
