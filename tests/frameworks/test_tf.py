"""TensorFlow 2: a custom loop with tf.train.CheckpointManager under a real daemon.

The daemon recognises CheckpointManager's `ckpt-N.index` + `ckpt-N.data-*` through
`format: auto`, and TRAINSUP_RESUME_FROM is the `ckpt-N` prefix, what `ckpt.restore` takes
(issue 12, item 4).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fw import need, need_daemon_format, scenario, write_job
from fw_formats import tf_ckpts

need("tensorflow")
need_daemon_format("tf")


def test_tf_checkpoint_wait_sigkill_preempt_start(daemon):
    ckpt = write_job(daemon, "tf", "train_tf.py", "--every", "100000", "--sleep-per-step", "0.02")
    scenario(daemon, "tf", tf_ckpts, startup=240)
    # Every relaunch was handed the ckpt-N prefix (not the .index, not the dir): what ckpt.restore takes.
    handed = [e["resume_from"] for e in daemon.history("tf") if e["kind"] == "launch" and e.get("resume_from")]
    assert len(handed) >= 2, daemon.history("tf")
    for r in handed:
        assert Path(r).parent == ckpt and re.fullmatch(r"ckpt-\d+", Path(r).name), f"TRAINSUP_RESUME_FROM={r}"
    # `format: auto` took them as tf, each index + shard one entry whose resume path is the prefix
    r = daemon.cli("checkpoints", "tf", "--json")
    assert r.returncode == 0, r.stderr
    rows = [c for c in json.loads(r.stdout) if c["valid"]]
    assert rows and all(c["format"] == "tf" for c in rows), rows
    for c in rows:
        assert c["resume_path"] == c["path"] and sorted(Path(m).name for m in c["members"]) == \
            [Path(c["path"]).name + ".data-00000-of-00001", Path(c["path"]).name + ".index"], c
