"""The checkpoint store: the trainsup format, validators, index, watcher and rotation.

Usable from any Python program (no torch, no daemon):

    from trainsup.checkpoint import CheckpointWriter
    with CheckpointWriter("ckpt", step=420, reason="periodic") as w:
        (w.path / "state.bin").write_bytes(data)
    # committed as ckpt/step-00000420/ on a clean exit of the block

Formats are a table (formats/: one module per format). Daemon side (daemon/checkpoints.py drives it, one custody.JobCheckpointDir per job): the dir is
resolved once and held as an fd (dirhandle) -> index.scan through that fd (ordered view,
cached verdicts, unmanaged names listed) -> liveness (monotonic observation, writer pids,
files the job holds open) -> rotation.plan_rotation (pure policy; the deletion design is
written at its top) -> deleter/trash (no symlink, no mount crossing, outcome recorded only
once gone, failures backed off); reprove re-checks what a launch is handed;
watch.CheckpointWatcher wakes the daemon. The watcher (watchdog) is imported lazily: `from trainsup.checkpoint.watch import
CheckpointWatcher`.
"""

import importlib
from typing import Any

# Re-exports resolved on first use (PEP 562): `trainsup.config` imports small submodules of
# this package (naming, claims), and the CLI, which reads the daemon config, must not pull
# in the hashing and validation stack (xxhash, crc32c) to send a request.
_EXPORTS = {
    "format": ("FORMAT_ID", "MANIFEST", "TMP_DIR", "CheckpointWriter", "ManifestError", "SaveError",
               "hash_file", "read_manifest", "step_dirname", "write_checkpoint"),
    "index": ("CheckpointDirError", "CheckpointInfo", "best", "latest_valid", "scan"),
    "rotation": ("DiskQuotaPlan", "RotationPlan", "plan_disk_quota", "plan_rotation"),
    "dirhandle": ("DirHandle",),
    "trash": ("TRASH_DIR", "DeleteError", "delete_entry", "empty_trash"),
    "formats.common": ("MemoryVerdictCache", "Verdict", "VerdictCache"),
    "validate": ("check_entry",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["DirHandleError"]


def __getattr__(name: str) -> Any:
    if name == "DirHandleError":
        return importlib.import_module(".dirhandle", __name__).CheckpointDirError
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
