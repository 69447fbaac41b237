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

from fw import REPO, SCRIPTS, exits, job_log, need, need_daemon_format, saves_logged, scenario, wait_steps, write_job
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


def _preempt_timed(daemon, name: str) -> tuple[str, float]:
    """`preempt`'s output and how long it took (it returns once the job is stopped)."""
    import time

    t0 = time.monotonic()
    r = daemon.cli("preempt", name, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    daemon.wait_state(name, "preempted", timeout=60)
    return r.stdout, took


def test_save_requested_with_its_own_save_function_exits_after_saved_not_after_the_grace(daemon, tmp_path):
    """Found with scripts saving with anything but atomic_save (here TF's CheckpointManager):
    save_requested() acknowledged every preempt notice as "taken, will exit", the daemon
    waited the whole grace (120 s here) while training went on, SIGTERM asked for a second
    save, and SIGKILL ended it. trainsup.saved(path) says "my save for this request is done"
    (exit 0); a script that only ends its loop on should_stop() gets SIGTERM at once after
    the confirmed save, which its loop already obeys: one save, exit 0, no grace idled."""
    write_job(daemon, "tfsaved", "train_tf.py", "--every", "100000", "--sleep-per-step", "0.02")
    script = tmp_path / "train_tf.py"
    text = (SCRIPTS / "train_tf.py").read_text()
    for old, new in (("            trainsup.saved(path)", "            pass"),
                     ("    while int(step) < args.steps:", "    while int(step) < args.steps and not trainsup.should_stop():")):
        assert old in text, old
        text = text.replace(old, new)
    script.write_text(text)
    write_job(daemon, "tfstop", str(script), "--every", "100000", "--sleep-per-step", "0.02")
    daemon.start()
    for name in ("tfsaved", "tfstop"):
        wait_steps(daemon, name, 5, timeout=240)
        out, took = _preempt_timed(daemon, name)
        assert "saved at step" in out, out
        assert took < 60, f"{name}: the stop took {took}s (grace 120s): {out}"
        assert exits(daemon, name)[-1]["code"] == 0, exits(daemon, name)
        assert len(saves_logged(daemon, name)) == 1, job_log(daemon, name)[-2000:]


def test_tf_state_file_stops_listing_checkpoints_rotation_deleted(daemon):
    """Found with CheckpointManager(max_to_keep=None) under keep_last 2: rotation dropped the
    saves it deleted from the `checkpoint` state file, but the manager rewrites that file
    from its in-memory list at its next save and listed them all again, for good. Every
    rotation pass now drops the names whose files are gone."""
    import signal

    from conftest import wait_for

    ckpt = write_job(daemon, "tfstate", "train_tf.py", "--every", "3", "--sleep-per-step", "0.05")
    job = daemon.jobs / "tfstate.yaml"
    job.write_text(job.read_text().replace("keep_last: 100", "keep_last: 2"))
    daemon.start()
    wait_for(lambda: len([e for e in daemon.history("tfstate") if e["kind"] == "deleted"]) >= 3, 240,
             "three deletions by rotation", interval=0.1)
    pid = daemon.status("tfstate")["pid"]
    os.kill(pid, signal.SIGSTOP)        # no more saves: the manager's last rewrite stays as it is
    try:
        wait_for(lambda: all((ckpt / f"{n}.index").exists() for n in tf_listed(ckpt)), 30,
                 "the state file to list only checkpoints on disk",
                 detail=lambda: f"listed {tf_listed(ckpt)}; dir {sorted(os.listdir(ckpt))}")
        assert len(tf_listed(ckpt)) >= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    daemon.cli("stop", "tfstate", "--no-save")
