"""The checkpoint store: the trainsup format, validators, index, watcher and rotation.

Usable from any Python program (no torch, no daemon):

    from trainsup.checkpoint import CheckpointWriter
    with CheckpointWriter("ckpt", step=420, reason="periodic") as w:
        (w.path / "state.bin").write_bytes(data)
    # committed as ckpt/step-00000420/ on a clean exit of the block

Daemon side (service.py drives it, one custody.JobCheckpointDir per job): the dir is
resolved once and held as an fd (dirhandle) -> index.scan through that fd (ordered view,
cached verdicts, unmanaged names listed) -> liveness (monotonic observation, writer pids,
files the job holds open) -> rotation.plan_rotation (pure policy; the deletion design is
written at its top) -> deleter/trash (no symlink, no mount crossing, outcome recorded only
once gone, failures backed off); reprove re-checks what a launch is handed;
watch.CheckpointWatcher wakes the daemon. The watcher (watchdog) is imported lazily: `from trainsup.checkpoint.watch import
CheckpointWatcher`.
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
from .index import CheckpointDirError, CheckpointInfo, best, latest_valid, scan  # noqa: F401
from .rotation import DiskQuotaPlan, RotationPlan, plan_disk_quota, plan_rotation  # noqa: F401
from .dirhandle import CheckpointDirError as DirHandleError, DirHandle  # noqa: F401
from .trash import TRASH_DIR, DeleteError, delete_entry, empty_trash  # noqa: F401
from .validate import MemoryVerdictCache, Verdict, VerdictCache, check_entry  # noqa: F401
