"""A requeue onto a node without the old disk restores every format's checkpoint, not only
trainsup's own directories: single files (torch .pth, .keras, Lightning's nested .ckpt),
file groups (TF's .index + shards, Paddle's .pdparams/.pdopt/.states) and HF's dirs.

Node A is a `trainsup run` whose checkpoint dir holds a real framework's good checkpoints
(tests/fixtures/frameworks, written by the pinned frameworks): the mirror uploads them.
The node goes (its checkpoint and state dirs deleted); node B, the same job file, restores
the newest from the store before its first launch: every file byte-identical to what the
framework wrote, at the same place, and the job is handed it in TRAINSUP_RESUME_FROM. The
store is file:// (fsspec's local filesystem: the mirror's code past the URL is the same as
for s3://, which test_mirror_s3.py runs on moto)."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import FRAMEWORK_FIXTURES, wait_for
from tests.integration.test_run import Run

pytest.importorskip("fsspec")

# (fixture dir, checkpoint.format, the entry restored: its path in the checkpoint dir)
CASES = {
    "torch-file": ("pytorch/good", "torch", "checkpoint_epoch3.pth"),
    "keras-file": ("keras/good/ckpt_keras", "keras", "epoch03.keras"),
    "lightning-nested": ("lightning/good", "lightning", "lightning_logs/version_0/checkpoints/epoch=2-step=12.ckpt"),
    "tf-group": ("tensorflow/good", "tf", "ckpt-3"),
    "paddle-group": ("paddle/good", "paddle", "iter_epoch_3"),
    "hf-dir": ("hf_trainer/good", "hf", "checkpoint-6"),
}

JOB = ("import os, sys, time\n"
       "with open(sys.argv[1], 'a') as f:\n"
       "    f.write(os.environ.get('TRAINSUP_RESUME_FROM', '') + '\\n')\n"
       "time.sleep(600)\n")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".trainsup") for part in p.relative_to(root).parts)}


@pytest.mark.parametrize("case", list(CASES))
def test_a_requeued_run_restores_the_newest_checkpoint_of_each_format(tmp_path, case):
    fixture, fmt, newest = CASES[case]
    src = FRAMEWORK_FIXTURES / fixture
    r = Run(tmp_path, "fw")
    seen = tmp_path / "resume.txt"
    r.file.write_text(f"name: fw\ncommand: {json.dumps([sys.executable, '-c', JOB, str(seen)])}\n"
                      f"checkpoint:\n  dir: {r.ckpt}\n  format: {fmt}\n"
                      f"  mirror:\n    url: file://{tmp_path / 'store'}/{{job}}\n")
    shutil.copytree(src, r.ckpt)
    try:
        r.start()
        uploads = wait_for(lambda: [e for e in r.history() if e["kind"] == "upload"], 60, "A's uploads",
                           proc=r.proc, detail=lambda: r.output()[-1500:])
        wait_for(lambda: Path(str(r.ckpt / newest)).name in json.dumps(
            [e for e in r.history() if e["kind"] == "upload"]), 60, f"{newest} uploaded")
        wait_for(lambda: seen.exists() and seen.read_text().endswith("\n"), 30, "A's job running")
        r.proc.send_signal(signal.SIGTERM)
        r.wait()
        assert uploads
        # the node is gone with its disk; the requeue lands on another
        shutil.rmtree(r.ckpt)
        shutil.rmtree(r.state)
        r.start()
        wait_for(lambda: seen.exists() and len(seen.read_text().splitlines()) >= 2, 60, "B's launch",
                 proc=r.proc, detail=lambda: r.output()[-1500:])
        handed = seen.read_text().splitlines()[-1]
        assert handed == str(r.ckpt / newest), (handed, r.output()[-2000:])
        (restored,) = [e for e in r.history() if e["kind"] == "restore"]
        got = {k: v for k, v in _files(r.ckpt).items() if not (fmt == "tf" and k == "checkpoint")}
        want = {k: v for k, v in _files(src).items() if k in got}
        assert got and got == want, sorted(set(got) ^ set(want))
        assert any(k == newest or k.startswith(newest) for k in got), (newest, sorted(got))
        assert restored["path"] == str(r.ckpt / newest), restored
        if fmt == "tf":
            # TF's own resume (CheckpointManager.latest_checkpoint, tf.train.latest_checkpoint)
            # reads the state file, which a machine that never saw the save does not have
            state = (r.ckpt / "checkpoint").read_text()
            assert 'model_checkpoint_path: "ckpt-3"' in state, state
    finally:
        r.kill()
