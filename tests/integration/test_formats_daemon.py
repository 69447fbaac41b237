"""Regressions for issue 12's late confirmation, under a real daemon with a job that saves
like Hugging Face Trainer (checkpoint-N/ first, trainer_state.json last, inside the dir)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import FRAMEWORK_FIXTURES, REPO, wait_for

HF_LIKE = REPO / "tests" / "helpers" / "hf_like_job.py"


def _job(daemon, name: str, flags: str, grace: float = 10.0) -> None:
    cmd = [sys.executable, str(HF_LIKE), "--record", str(daemon.root / f"{name}.rec"), *flags.split()]
    daemon.write_job(name, (
        f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
        f"checkpoint:\n  dir: {daemon.root / (name + '-ckpt')}\n"
        f"emergency_save:\n  grace: {grace}\n"))


def _indexed(daemon, name: str) -> list[dict]:
    r = daemon.request("checkpoints", name)
    assert r["ok"], r
    return r["result"]


def _saved(daemon, name: str) -> list[dict]:
    return [r for r in daemon.records(name) if r["event"] == "saved"]


def test_hf_save_completing_inside_checkpoint_dir_confirms_checkpoint_wait_within_1s(daemon):
    _job(daemon, "hf", "--start-step 5 --inner-delay 0.4")
    daemon.start()
    daemon.wait_ready("hf")
    wait_for(lambda: any(c["valid"] for c in _indexed(daemon, "hf")), 10, "checkpoint-5 indexed valid")
    r = daemon.request("checkpoint", "hf", wait=True, timeout=30)
    returned = time.time()
    assert r["ok"], r
    new = wait_for(lambda: [s for s in _saved(daemon, "hf") if s["step"] > 5], 5, "the save record")[-1]
    assert r["result"]["step"] == new["step"] > 5
    # the completion is trainer_state.json inside checkpoint-N/: seen by its event, not a rescan
    assert returned - new["state_at"] <= 1.0, f"confirmed {returned - new['state_at']:.2f}s after the save"


def test_preempt_never_confirms_with_an_older_step(daemon):
    # As found: the index had checkpoint-50; on the request an old, complete checkpoint-92
    # appears (hour-old mtimes: a late-seen completion, an `rsync -a`), and the real save at
    # the job's current step finishes 1.5 s later. 92 is past the newest valid step at the
    # request, so only its commit time tells it is not the save: the preempt must wait.
    step_file = daemon.root / "pre.step"
    _job(daemon, "pre", f"--start-step 50 --inner-delay 1.5 --stale 92 --progress {step_file}")
    daemon.start()
    daemon.wait_ready("pre")
    wait_for(lambda: any(c["valid"] for c in _indexed(daemon, "pre")), 10, "checkpoint-50 indexed valid")
    wait_for(lambda: step_file.exists() and int(step_file.read_text() or 0) > 100, 10, "the job past step 100")
    r = daemon.request("preempt", "pre", grace=20)
    assert r["ok"], r
    out = r["result"]
    assert out["outcome"] == "saved" and out["step"] > 92, out    # never the old checkpoint-92
    # the job records its save right after trainer_state.json, maybe after the confirmation
    saved = wait_for(lambda: [s for s in _saved(daemon, "pre") if s["step"] not in (50, 92)], 5, "the save record")
    assert out["step"] == saved[-1]["step"] > 92, (out, saved)
    # checkpoint-92 was indexed valid meanwhile: found, and still not taken as the save
    hist = daemon.history("pre")
    assert any(e.get("kind") == "checkpoint" and e.get("step") == 92 for e in hist), hist


def _warnings(daemon, name: str) -> list[str]:
    return daemon.status(name).get("warnings") or []


def test_status_warns_when_auto_recognises_nothing_in_a_non_empty_dir(daemon):
    daemon.fakejob("npz")
    ck = daemon.root / "npz-ckpt"
    ck.mkdir()
    (ck / "weights_0100.npz").write_bytes(b"\0" * 64)
    daemon.start()
    daemon.wait_ready("npz")
    wait_for(lambda: any(w.startswith(f"no checkpoints recognised in {ck}: set checkpoint.format")
                         for w in _warnings(daemon, "npz")), 15, "the unrecognised-dir warning")


def test_status_warns_about_checkpoints_written_in_place(daemon):
    import zipfile
    daemon.fakejob("inplace")
    ck = daemon.root / "inplace-ckpt"
    ck.mkdir()
    with zipfile.ZipFile(ck / "latest.pth", "w") as z:      # a complete torch-style zip
        z.writestr("latest/data.pkl", b"\x80\x02}q\x00.")
    daemon.start()
    daemon.wait_ready("inplace")
    wait_for(lambda: any(c["valid"] for c in _indexed(daemon, "inplace")), 10, "latest.pth indexed valid")
    with open(ck / "latest.pth", "r+b") as f:                # what torch.save's O_TRUNC leaves
        f.truncate(0)
    wait_for(lambda: any("checkpoints written in place: latest.pth" in w for w in _warnings(daemon, "inplace")),
             15, "the written-in-place warning")


# ---------------------------------------------------------------- resume wiring per format

FIXTURES = FRAMEWORK_FIXTURES
LV = "lightning_logs/version_0/checkpoints/"

# The first attempt leaves a framework's tree (as the real framework left it when killed)
# and crashes; the relaunch must be handed what that framework's resume call takes.
RESUME_JOB = r"""
import json, os, shutil, sys, time
ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]
if os.environ["TRAINSUP_ATTEMPT"] == "1":
    shutil.copytree(sys.argv[1], ck, dirs_exist_ok=True)
    for d, _, files in os.walk(ck):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    sys.exit(3)
with open(sys.argv[2], "w") as f:
    json.dump({"env": os.environ["TRAINSUP_RESUME_FROM"], "argv": sys.argv[3:]}, f)
time.sleep(600)
"""


@pytest.mark.parametrize("tree,resume", [
    ("paddle/interrupted", {"best_accuracy"}),             # PaddleOCR's own `latest` is broken here
    ("paddle/good", {"iter_epoch_3"}),
    ("tensorflow/interrupted", {"ckpt-2"}),                 # the prefix, not ckpt-2.index
    ("keras/interrupted_in_backup_write", {"ckpt_weights/epoch03.weights.h5", "ckpt_keras/epoch03.keras"}),
    ("lightning/interrupted", {LV + "epoch=1-step=8.ckpt"}),
    ("hf_trainer/interrupted", {"checkpoint-4"}),
])
def test_relaunch_resumes_each_framework_from_what_its_resume_call_takes(daemon, tree, resume):
    name = "resume"
    out = daemon.root / "resumed.json"
    script = daemon.root / "resume_job.py"
    script.write_text(RESUME_JOB)
    cmd = [sys.executable, str(script), str(FIXTURES / tree), str(out)]
    ck = daemon.root / "ck"
    daemon.write_job(name, (
        f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
        f"checkpoint:\n  dir: {ck}\n  resume_args: [\"--resume\", \"{{checkpoint}}\"]\n"
        "restart:\n  backoff: {initial: 0.1s}\n"))
    daemon.start()
    got = wait_for(lambda: out.exists() and out.stat().st_size and json.loads(out.read_text()), 30,
                   "the relaunched attempt to record its resume point")
    assert got["env"] in {str(ck / r) for r in resume}, got
    assert got["argv"] == ["--resume", got["env"]]


COPY_JOB = r"""
import os, shutil, sys, time
ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]
shutil.copytree(sys.argv[1], ck, dirs_exist_ok=True)
for d, _, files in os.walk(ck):
    os.chmod(d, 0o755)
    for f in files:
        os.chmod(os.path.join(d, f), 0o644)
time.sleep(600)
"""


def test_tf_rotation_rewrites_the_state_file_and_deletes_each_checkpoint_whole(daemon):
    script = daemon.root / "copy_job.py"
    script.write_text(COPY_JOB)
    ck = daemon.root / "ck"
    cmd = [sys.executable, str(script), str(FIXTURES / "tensorflow/good")]
    daemon.write_job("tf", f"name: tf\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
                           f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n")
    daemon.start()
    wait_for(lambda: sorted(p.name for p in ck.iterdir() if not p.name.startswith("."))
             == ["checkpoint", "ckpt-3.data-00000-of-00001", "ckpt-3.index"], 20,
             "ckpt-1 and ckpt-2 rotated away, every file of each")
    state = (ck / "checkpoint").read_text()
    # what tf.train.latest_checkpoint / CheckpointManager read: nothing deleted is listed
    assert 'model_checkpoint_path: "ckpt-3"' in state
    assert '"ckpt-1"' not in state and '"ckpt-2"' not in state
    wait_for(lambda: [c["name"] for c in _indexed(daemon, "tf")] == ["ckpt-3"], 10, "the index after rotation")
    r = daemon.cli("checkpoints", "tf")
    assert r.returncode == 0 and "ck/ckpt-3" in r.stdout, r.stdout + r.stderr


HF_PICK_JOB = r"""
import json, os, re, shutil, sys, time
ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]
if os.environ["TRAINSUP_ATTEMPT"] == "1":
    # the first attempt 'dies while saving checkpoint-6' (a real interrupted HF tree)
    shutil.copytree(sys.argv[1], ck, dirs_exist_ok=True)
    sys.exit(1)
# what transformers.trainer_utils.get_last_checkpoint picks: the highest checkpoint-N dir
dirs = [d for d in os.listdir(ck) if re.fullmatch(r"checkpoint-\d+", d) and os.path.isdir(os.path.join(ck, d))]
pick = max(dirs, key=lambda d: int(d.split("-")[1])) if dirs else None
with open(sys.argv[2], "w") as f:
    json.dump({"hf_pick": pick, "resume": os.environ["TRAINSUP_RESUME_FROM"]}, f)
time.sleep(600)
"""


def test_interrupted_newest_save_is_moved_aside_before_the_relaunch(daemon):
    """Issue 12, Deliver 3: a first attempt killed inside HF's save of checkpoint-6 left it
    half-written; HF's own get_last_checkpoint would pick it and crash-loop. Before the
    relaunch the daemon moves it aside (renamed, bytes kept, listed with why)."""
    script = daemon.root / "hf_pick.py"
    script.write_text(HF_PICK_JOB)
    ck, out = daemon.root / "ck", daemon.root / "picked.json"
    cmd = [sys.executable, str(script), str(FIXTURES / "hf_trainer/interrupted"), str(out)]
    daemon.write_job("hfpick", f"name: hfpick\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
                               f"checkpoint:\n  dir: {ck}\n  keep_last: 5\n"
                               "restart:\n  backoff: {initial: 0.1s, max: 0.1s}\n")
    daemon.start()
    picked = wait_for(lambda: out.exists() and json.loads(out.read_text()), 30, "the second attempt's view")
    assert picked == {"hf_pick": "checkpoint-4", "resume": str(ck / "checkpoint-4")}, picked
    assert not (ck / "checkpoint-6").exists()
    assert (ck / ".trainsup-aside" / "checkpoint-6" / "model.safetensors").exists()   # bytes kept
    rows = daemon.request("checkpoints", "hfpick")["result"]
    aside = [r for r in rows if r["path"].endswith(".trainsup-aside/checkpoint-6")]
    assert aside and aside[0]["valid"] is False and "moved aside" in aside[0]["invalid_reason"], rows
    moved = [e for e in daemon.history("hfpick") if e["kind"] == "moved-aside"]
    assert len(moved) == 1 and moved[0]["path"].endswith("/checkpoint-6"), moved
