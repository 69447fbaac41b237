"""The checkpoint store: the trainsup format, validators, index, watcher and rotation.

Usable from any Python program (no torch, no daemon):

    from supervisor.checkpoint import CheckpointWriter
    with CheckpointWriter("ckpt", step=420, reason="periodic") as w:
        (w.path / "state.bin").write_bytes(data)
    # committed as ckpt/step-00000420/ on a clean exit of the block
"""

from .format import (  # noqa: F401
    FORMAT_ID,
    MANIFEST,
    TMP_DIR,
    CheckpointWriter,
    ManifestError,
    SaveError,
    hash_file,
    read_manifest,
    step_dirname,
    write_checkpoint,
)
