"""CheckpointWriter.hashed_file: the manifest's digest is taken while the file is written
(a 1 GiB state is not read back at commit), and it is the digest of what is on disk."""

from __future__ import annotations

import json
import os

import pytest
from trainsup.checkpoint import format as fmt
from trainsup.checkpoint import scan


def test_digest_taken_while_writing_matches_the_file_and_is_not_re_read(tmp_path, monkeypatch):
    w = fmt.CheckpointWriter(tmp_path, 7)
    with w:
        with w.hashed_file("state.pt") as f:
            for _ in range(16):
                f.write(os.urandom(1 << 16))
            f.write(memoryview(b"tail"))
        (w.path / "other.bin").write_bytes(b"x" * 100)       # written plainly: hashed at commit
        read_back = []
        real = fmt.hash_file
        monkeypatch.setattr(fmt, "hash_file", lambda p, algo="xxh3_128": read_back.append(os.path.basename(p))
                            or real(p, algo))
    assert read_back == ["other.bin"]
    m = json.loads((tmp_path / "step-00000007" / "MANIFEST.json").read_text())
    assert m["files"]["state.pt"]["xxh3_128"] == real(tmp_path / "step-00000007" / "state.pt")
    assert [i.valid for i in scan(tmp_path)] == [True]


def test_a_file_changed_after_its_hashed_write_is_hashed_again(tmp_path):
    w = fmt.CheckpointWriter(tmp_path, 8)
    with w:
        with w.hashed_file("state.pt") as f:
            f.write(b"first")
        (w.path / "state.pt").write_bytes(b"second, longer")
    m = json.loads((tmp_path / "step-00000008" / "MANIFEST.json").read_text())
    assert m["files"]["state.pt"]["size"] == len(b"second, longer")
    assert [i.valid for i in scan(tmp_path)] == [True]


def test_a_failed_write_leaves_no_checkpoint(tmp_path):
    w = fmt.CheckpointWriter(tmp_path, 9)
    with pytest.raises(RuntimeError):
        with w:
            with w.hashed_file("state.pt") as f:
                f.write(b"partial")
                raise RuntimeError("killed mid-save")
    assert not (tmp_path / "step-00000009").exists()


def test_hash_fd_read_ahead_hashes_every_byte_at_every_size(tmp_path):
    """hash_fd reads files past 4 MiB on a helper thread in 2 MiB buffers (the tmpfs
    re-proof: 0.72x -> 0.9x of a plain read): the digest is the whole file's at sizes
    around each boundary, for both hashes."""
    import hashlib
    import os

    import xxhash
    from trainsup.checkpoint.format import hash_file

    blob = os.urandom((10 << 20) + 3)
    for size in (0, 1, (2 << 20) - 1, 4 << 20, (4 << 20) + 1, (6 << 20) + 7, len(blob)):
        p = tmp_path / f"f{size}"
        p.write_bytes(blob[:size])
        assert hash_file(p) == xxhash.xxh3_128(blob[:size]).hexdigest(), size
        assert hash_file(p, "sha256") == hashlib.sha256(blob[:size]).hexdigest(), size
