"""A writer killed at every phase, and a full disk, never leave a 'valid' partial checkpoint."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from trainsup.checkpoint import SaveError, write_checkpoint
from trainsup.checkpoint.index import latest_valid, scan

REPO = Path(__file__).resolve().parents[2]
WRITER = """
import sys
from trainsup.checkpoint import write_checkpoint
write_checkpoint(sys.argv[1], int(sys.argv[2]), {"w.bin": b"W" * 300000, "sub/o.bin": b"O" * 1000})
"""
PHASES = ["files-written", "files-synced", "manifest-written", "renamed", "dir-synced"]


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_each_phase(tmp_path, phase):
    write_checkpoint(tmp_path, 1, {"w.bin": b"V" * 1000})
    env = {**os.environ, "TRAINSUP_TEST_KILL_AT": phase, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), "2"], env=env, timeout=60)
    assert r.returncode == -signal.SIGKILL
    infos = scan(tmp_path)
    committed = phase in ("renamed", "dir-synced")
    lv = latest_valid(infos)
    assert lv.step == (2 if committed else 1)
    partial = [i for i in infos if i.step == 2]
    if committed:
        assert partial[0].valid and not partial[0].in_progress
    else:
        # only ever seen as an in-progress tmp entry, never as a checkpoint
        assert all(i.in_progress and not i.valid for i in partial) and len(partial) == 1


def test_enospc_during_save_raises_and_cleans_up():
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tempfile.mkdtemp(prefix="trainsup-enospc-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], capture_output=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        ck = Path(mnt) / "ckpt"
        write_checkpoint(ck, 1, {"a": b"x" * 100_000})
        before = (ck / "step-00000001" / "a").read_bytes()
        with pytest.raises(SaveError):
            write_checkpoint(ck, 2, {"a": b"y" * 600_000, "b": b"z" * 600_000})
        assert os.listdir(ck / ".trainsup-tmp") == []
        infos = scan(ck)
        assert [i.step for i in infos] == [1] and latest_valid(infos).step == 1
        assert (ck / "step-00000001" / "a").read_bytes() == before
        write_checkpoint(ck, 3, {"a": b"ok"})     # space came back: saving works again
        assert latest_valid(scan(ck)).step == 3
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)
