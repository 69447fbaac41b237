"""A committed trainsup checkpoint of one large file of real (non-zero, non-sparse) bytes,
for tests and benches of long validations: a sparse or zero file is refused or hashed
for free, never read the way a real checkpoint is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def write_dense_checkpoint(ck: Path, size: int, seed: bytes, step: int = 1) -> Path:
    """`ck`/step-NNNNNNNN/ holding weights.bin (`size` bytes, a multiple of 1 MiB) and its
    sha256 manifest. Returns the entry."""
    e = ck / f"step-{step:08d}"
    e.mkdir(parents=True)
    block = hashlib.sha256(seed).digest() * (1 << 15)        # 1 MiB
    h = hashlib.sha256()
    with open(e / "weights.bin", "wb") as f:
        for i in range(size // len(block)):
            chunk = i.to_bytes(8, "little") + block[8:]       # every MiB differs
            f.write(chunk)
            h.update(chunk)
    (e / "MANIFEST.json").write_text(json.dumps({
        "format": "trainsup-checkpoint/1", "step": step,
        "files": {"weights.bin": {"size": size, "sha256": h.hexdigest()}}}))
    return e
