"""TensorFlow 2: a custom loop with tf.train.CheckpointManager under a real daemon.

The daemon recognises CheckpointManager's `ckpt-N.index` + `ckpt-N.data-*` through
`format: auto`, and TRAINSUP_RESUME_FROM is the `ckpt-N` prefix, what `ckpt.restore` takes
(issue 12, item 4).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from fw import REPO, need, need_daemon_format, scenario, write_job
from fw_formats import tf_ckpts, tf_listed

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
    rows = [c for c in json.loads(r.stdout)["checkpoints"] if c["valid"]]
    assert rows and all(c["format"] == "tf" for c in rows), rows
    for c in rows:
        assert c["resume_path"] == c["path"] and sorted(Path(m).name for m in c["members"]) == \
            [Path(c["path"]).name + ".data-00000-of-00001", Path(c["path"]).name + ".index"], c


# Runs in a child: TensorFlow imported into the pytest process makes a later paddle import
# there segfault (seen in one `pytest tests/frameworks` run).
_RACE = textwrap.dedent("""
    import json, os, sys
    import tensorflow as tf
    from trainsup.checkpoint.formats import tf_state as bookkeeping
    real_fsync, real_exchange = os.fsync, getattr(bookkeeping, "_exchange", None)
    for d, swap in zip(sys.argv[1::2], sys.argv[2::2]):
        manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(tf.zeros(4))), d, max_to_keep=None)
        for n in (1, 2, 3):
            manager.save(checkpoint_number=n)
        fired, swaps = [], []

        def fsync_then_tf_saves(fd):          # TF commits ckpt-4 inside trainsup's rewrite
            real_fsync(fd)
            if not fired:
                fired.append(manager.save(checkpoint_number=4))

        def exchange(*a):                     # "no-rename-exchange": a filesystem without it
            swaps.append(False if swap == "no-rename-exchange" else real_exchange(*a))
            return swaps[-1]

        os.fsync, bookkeeping._exchange = fsync_then_tf_saves, exchange
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        bookkeeping.forget_in_tf_state(dfd, ["ckpt-1"])          # trainsup, before deleting ckpt-1
        os.close(dfd)
        os.fsync, bookkeeping._exchange = real_fsync, real_exchange
        print(json.dumps({"swap": swap, "fired": fired, "swaps": swaps, "latest": tf.train.latest_checkpoint(d)}))
""")


def test_trainsup_rewriting_the_state_file_never_drops_a_save_tf_commits_meanwhile(tmp_path):
    """Found here under rotation (train_tf.py --every 1, keep_last 2, a tiny quota, the state
    file polled every 0.5 ms): ckpt-574, the newest save and complete on disk, vanished from
    `checkpoint` after trainsup's rewrite (1 of 6 deletions): trainsup read the state file, TF
    committed ckpt-574 (its own temp + rename), and trainsup renamed its rewrite of the older
    text over it. The daemon then takes the newest save for "not committed".

    The race is made certain by committing TF's save (a real CheckpointManager.save) at the
    fsync of trainsup's rewrite, the moment between its read and its rename; with and without
    renameat2's RENAME_EXCHANGE (the fix swaps its rewrite in and checks what came out)."""
    from trainsup.checkpoint.index import scan

    swaps = ["rename-exchange", "no-rename-exchange"]
    dirs = {s: tmp_path / s for s in swaps}
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-c", _RACE, *(a for s in swaps for a in (str(dirs[s]), s))],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [o["swap"] for o in results] == swaps, r.stdout
    for out in results:
        d = dirs[out["swap"]]
        assert out["fired"], f"{out['swap']}: TF's save did not land inside the rewrite"
        assert out["latest"] == str(d / "ckpt-4"), (out, (d / "checkpoint").read_text())  # tf.train.latest_checkpoint
        assert "ckpt-4" in tf_listed(d) and "ckpt-1" not in tf_listed(d), (out, (d / "checkpoint").read_text())
        verdicts = {i.name: (i.valid, i.invalid_reason) for i in scan(d, "auto")}
        assert verdicts["ckpt-4"] == (True, None), (out["swap"], verdicts)
        assert out["swap"] != "rename-exchange" or out["swaps"] and all(out["swaps"]), f"not swapped: {out}"
