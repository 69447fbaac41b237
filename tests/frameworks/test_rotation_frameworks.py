"""Issue 12: trainsup's rotation (keep_last: 2 and a tiny quota) under each framework's own
typical script, run by a real daemon.

What a user checks: older saves are gone, a file that is not a checkpoint (notes.txt,
pretrained.pt, there before the first launch) keeps its bytes whatever the quota, a
SIGKILLed job resumes through the framework's own resume call from the newest valid
checkpoint, and the framework's own rotation (HF save_total_limit, Lightning save_top_k)
keeps working after trainsup deleted some of its files (no crash on a missing file).

The scripts are tests/frameworks/scripts/train_*.py, copied with only the framework's
own rotation switched on (one keyword), so they stay the typical scripts the other
tests run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
from pathlib import Path

from conftest import REPO, wait_for
from fw import SCRIPTS, job_log, need, resumed_lines, steps_since_resume
from fw_formats import hf_complete, paddle_numbered, paddle_resume_point, paddle_step, tf_ckpts, tf_listed

QUOTA = 4096      # smaller than one checkpoint: only protections keep anything


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _variant(tmp_path: Path, script: str, old: str, new: str) -> Path:
    text = (SCRIPTS / script).read_text()
    assert old in text, f"{script} no longer has {old!r}"
    out = tmp_path / script
    out.write_text(text.replace(old, new))
    return out


def _job(daemon, name: str, script: Path, *args: str) -> tuple[Path, dict[Path, str]]:
    """A job with keep_last 2 and a tiny quota; its checkpoint dir already holds two files
    that are not checkpoints. Returns the dir and those files' hashes."""
    ckpt = daemon.root / f"{name}-ckpt"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("lr 1e-3, seed 0: do not delete\n")
    (ckpt / "pretrained.pt").write_bytes(os.urandom(64 << 10))     # alone over the quota
    keep = {p: _sha(p) for p in (ckpt / "notes.txt", ckpt / "pretrained.pt")}
    cmd = [sys.executable, str(script), *args]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2"}
    daemon.write_job(name, f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {daemon.root}\n"
                           f"env: {json.dumps(env)}\nstop_timeout: 60s\n"
                           f"checkpoint:\n  dir: {ckpt}\n  keep_last: 2\n  keep_best: 0\n  quota: {QUOTA}\n"
                           f"restart:\n  backoff: {{initial: 0}}\n  max_restarts_without_progress: 20\n")
    return ckpt, keep


def _wait(daemon, name: str, pred, timeout: float, what: str):
    """wait_for, and on a timeout say what the job and its dir look like then."""
    try:
        return wait_for(pred, timeout, what, interval=0.05)
    except AssertionError as e:
        ckpt = daemon.root / f"{name}-ckpt"
        listing = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
        raise AssertionError(f"{e}\nstatus: {daemon.status(name)}\ndir: {listing}\n"
                             f"checkpoints: {daemon.cli('checkpoints', name).stdout}\nhistory: {daemon.history(name)[-8:]}\nlog tail: {job_log(daemon, name)[-1500:]}") from None


def _deleted_by_trainsup(daemon, name: str) -> list[str]:
    return [e["path"] for e in daemon.history(name) if e["kind"] == "deleted"]


def _exits(daemon, name: str) -> list[tuple]:
    return [(e.get("code"), e.get("signal")) for e in daemon.history(name) if e["kind"] == "exit"]


def _rotation_scenario(daemon, name: str, ckpt: Path, keep: dict[Path, str], complete, startup: float = 180.0,
                       resume_point=None):
    """complete(dir) -> {path: step} of the numbered checkpoints fully on disk;
    resume_point(dir) -> (path, step) the framework resumes from (default: the newest of those)."""
    seen: dict[Path, int] = {}

    def saves_and_rotation():
        seen.update(complete(ckpt))
        return len(seen) >= 4 and _deleted_by_trainsup(daemon, name)

    daemon.start()
    _wait(daemon, name, saves_and_rotation, startup, f"{name}: 4 saves and a trainsup deletion")
    first = min(seen, key=seen.__getitem__)
    _wait(daemon, name, lambda: not first.exists(), 60, f"the oldest save {first} to be rotated away")
    for p, h in keep.items():
        assert _sha(p) == h, f"{p.name} changed or vanished under a {QUOTA}-byte quota"

    # SIGKILL: stop the job first so the newest complete save is known, then kill it
    pid = daemon.status(name)["pid"]
    n_resumes = len(resumed_lines(daemon, name))
    os.kill(pid, signal.SIGSTOP)
    newest_path, newest_step = (resume_point or (lambda d: max(complete(d).items(), key=lambda kv: kv[1])))(ckpt)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(resumed_lines(daemon, name)) > n_resumes, startup, f"{name} to resume after SIGKILL")
    assert resumed_lines(daemon, name)[-1] == str(newest_path)
    wait_for(lambda: len(steps_since_resume(daemon, name)) > 3, startup, f"{name} to train after the resume")
    assert steps_since_resume(daemon, name)[0] == newest_step + 1

    # after the resume both rotations keep running: new saves come and go, nothing crashes
    after: set[Path] = set()
    n_del = len(_deleted_by_trainsup(daemon, name))

    def more():
        after.update(p for p in complete(ckpt) if p not in seen)
        return len(after) >= 3 and len(_deleted_by_trainsup(daemon, name)) > n_del

    _wait(daemon, name, more, startup, f"{name}: 3 more saves and rotation after the resume")
    assert daemon.status(name)["state"] == "running", daemon.status(name)
    ex = _exits(daemon, name)
    assert len(ex) == 1 and ex[0][1] in (signal.SIGKILL, "SIGKILL", "KILL"), f"only our SIGKILL ended the job: {ex}"
    assert "Traceback" not in job_log(daemon, name), job_log(daemon, name)[-3000:]
    for p, h in keep.items():
        assert _sha(p) == h, f"{p.name} changed or vanished under a {QUOTA}-byte quota"
    daemon.cli("stop", name, "--no-save")


# ------------------------------------------------------------------------------- HF

def test_hf_rotation_keeps_resume_and_save_total_limit_working(daemon, tmp_path):
    need("transformers")
    script = _variant(tmp_path, "train_hf.py", "save_steps=args.every,", "save_steps=args.every, save_total_limit=2,")
    ckpt, keep = _job(daemon, "hfrot", script, "--steps", "100000", "--every", "3", "--sleep-per-step", "0.05")
    _rotation_scenario(daemon, "hfrot", ckpt, keep, hf_complete)
    assert len([p for p in ckpt.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]) <= 3


# ------------------------------------------------------------------------- Lightning

_PL = re.compile(r"step=(\d+)\.ckpt$")


def _pl_complete(d: Path) -> dict[Path, int]:
    import zipfile

    out = {}
    for p in d.glob("*.ckpt"):
        m = _PL.search(p.name)
        if not m:
            continue
        try:
            with zipfile.ZipFile(p) as z:        # a torch zip is complete when its directory reads
                z.namelist()
        except (OSError, zipfile.BadZipFile):
            continue
        out[p] = int(m.group(1))
    return out


def test_lightning_rotation_keeps_resume_and_save_top_k_working(daemon, tmp_path):
    need("lightning")
    script = _variant(tmp_path, "train_lightning.py", "save_top_k=-1", 'save_top_k=2, monitor="step", mode="max"')
    ckpt, keep = _job(daemon, "plrot", script, "--steps", "100000", "--every", "3", "--sleep-per-step", "0.05")
    _rotation_scenario(daemon, "plrot", ckpt, keep, _pl_complete)
    # The stop's own save lands last and is rotated after it, asynchronously: wait for that
    # pass rather than read the dir at the instant the stop returns.
    _wait(daemon, "plrot", lambda: len(list(ckpt.glob("*.ckpt"))) <= 3, 60,
          "rotation after the stop's save to leave at most 3 .ckpt files")


# ----------------------------------------------------------------------------- Keras

def _keras_complete(d: Path) -> dict[Path, int]:
    out = {}
    for p in (d / "ckpt_weights").glob("epoch*.weights.h5"):
        try:
            with open(p, "rb") as f:     # h5py writes in place; a closed file has its superblock
                head = f.read(8)
        except OSError:
            continue
        if head == b"\x89HDF\r\n\x1a\n":
            out[p] = int(re.search(r"(\d+)", p.name).group(1))
    return out


def _keras_backup(d: Path) -> tuple[Path, int]:
    return d / "latest.weights.h5", int(json.loads((d / "training_metadata.json").read_text())["step"])


def test_keras_rotation_keeps_resume_from_the_backup(daemon, tmp_path):
    """Found here: valid ModelCheckpoint epochNN.weights.h5 files (h5py writes in place, so
    each was seen growing) stayed KEPT 'in-progress' for the whole grace, so rotation fell
    behind and the dir grew past its quota."""
    need("keras")
    need("tensorflow")
    old = 'callbacks=[PrintSteps(args.sleep_per_step), TrainsupBackup(save_freq="epoch")]'
    new = ('callbacks=[PrintSteps(args.sleep_per_step), TrainsupBackup(save_freq="epoch"), '
           'keras.callbacks.ModelCheckpoint(os.path.join(os.environ["TRAINSUP_CHECKPOINT_DIR"], "ckpt_weights", '
           '"epoch{epoch:02d}.weights.h5"), save_weights_only=True)]')
    script = _variant(tmp_path, "train_keras.py", old, new)
    ckpt, keep = _job(daemon, "kerasrot", script, "--sleep-per-step", "0.01")
    _rotation_scenario(daemon, "kerasrot", ckpt, keep, _keras_complete, startup=240, resume_point=_keras_backup)
    assert (ckpt / "latest.weights.h5").exists(), "the backup alias was rotated away"


# ---------------------------------------------------------------------------- Paddle

def _paddle_complete(d: Path) -> dict[Path, int]:
    return {p.with_name(p.name + ".pdparams"): s for p, s in paddle_numbered(d).items()}


def test_paddleocr_rotation_keeps_resume_from_the_newest_prefix(daemon, tmp_path):
    """PaddleOCR has no rotation of its own: trainsup's keeps iter_epoch_N groups whole (the
    three files go together), leaves the `latest` alias it rewrites every epoch, and the
    loop's load_model(Global.checkpoints) resumes from the newest group after a SIGKILL."""
    need("paddle")      # find_spec only: paddle imported into this process after TF segfaults
    ckpt, keep = _job(daemon, "pdrot", SCRIPTS / "train_paddleocr.py", "--batches", "3", "--sleep-per-step", "0.05")
    _rotation_scenario(daemon, "pdrot", ckpt, keep, _paddle_complete, startup=240,
                       resume_point=paddle_resume_point)
    groups = {n.split(".")[0] for n in os.listdir(ckpt) if n.startswith("iter_epoch_")}
    for g in groups:     # deleted as one unit: no group left with a file missing
        files = sorted(n for n in os.listdir(ckpt) if n.split(".")[0] == g)
        assert files in ([f"{g}.pdopt", f"{g}.pdparams", f"{g}.states"], []), f"a partial group is left: {files}"
    # rotation passes are >= 1 s apart and this loop saves every ~0.2 s: count only what is
    # older than the resume point (it stays while the attempt that resumed from it runs)
    resumed = Path(resumed_lines(daemon, "pdrot")[-1]).name
    older = [g for g in groups if paddle_step(ckpt / g) < paddle_step(ckpt / resumed) and g != resumed]
    assert not older, f"saves older than the resume point survived keep_last 2 and the quota: {older}"
    assert paddle_step(ckpt / "latest") is not None, "the `latest` alias was deleted"


# -------------------------------------------------------------------------- TensorFlow

def _tf_complete(d: Path) -> dict[Path, int]:
    """ckpt-N.index of every save the `checkpoint` state file lists (TF's commit marker)."""
    return {p.with_name(p.name + ".index"): s for p, s in tf_ckpts(d).items()}


def _tf_resume_point(d: Path) -> tuple[Path, int]:
    idx, step = max(_tf_complete(d).items(), key=lambda kv: kv[1])
    return idx.with_suffix(""), step        # the ckpt-N prefix ckpt.restore takes


def test_tf_rotation_keeps_checkpoint_manager_and_its_state_file_working(daemon, tmp_path):
    """CheckpointManager(max_to_keep=2) rotates on its own while trainsup's keep_last 2 and
    quota delete under it: after every trainsup deletion the `checkpoint` state file lists
    no deleted save (trainsup rewrites it first), the manager's own sweep of a save trainsup
    already deleted raises nothing, and ckpt.restore resumes from the newest after SIGKILL."""
    need("tensorflow")
    ckpt, keep = _job(daemon, "tfrot", SCRIPTS / "train_tf.py", "--every", "3", "--max-to-keep", "2",
                      "--sleep-per-step", "0.05")
    checked: list[int] = [0]    # numbers of trainsup deletions after which the state file was read

    def complete_and_state_file(d: Path) -> dict[Path, int]:
        deleted = {Path(p).name for p in _deleted_by_trainsup(daemon, "tfrot")}
        if len(deleted) > checked[-1]:
            listed = set(tf_listed(d))
            assert not listed & deleted, f"the checkpoint state file lists deleted saves {listed & deleted}"
            checked.append(len(deleted))
        return _tf_complete(d)

    _rotation_scenario(daemon, "tfrot", ckpt, keep, complete_and_state_file, startup=240,
                       resume_point=_tf_resume_point)
    assert len(checked) >= 3, "the state file was never read after a trainsup deletion"
    listed = tf_listed(ckpt)
    assert listed and all((ckpt / f"{n}.index").exists() for n in listed), (listed, sorted(os.listdir(ckpt)))
    assert len(list(ckpt.glob("ckpt-*.index"))) <= 3
    assert not list(ckpt.glob("*_temp")), sorted(os.listdir(ckpt))


def test_tf_saves_of_a_running_job_are_rotated_within_seconds_not_after_the_grace(daemon, tmp_path):
    """A job saving every ~0.5 s (a 4 MB state, so the daemon sees each save while it is
    written) under keep_last 2 and a quota smaller than one save: seconds after each commit
    at most keep_last complete saves (+1 being written) are on disk, not one per save of
    the last two minutes. Found here: a save sighted mid-write stayed live for grace + 5 s
    once complete (42 valid saves, 344 MB over a 4 KB quota in 25 s)."""
    need("tensorflow")
    ckpt, keep = _job(daemon, "tfquiet", SCRIPTS / "train_tf.py", "--every", "5", "--pad-mb", "4",
                      "--sleep-per-step", "0.05")
    daemon.start()
    seen: set[Path] = set()
    _wait(daemon, "tfquiet", lambda: seen.update(tf_ckpts(ckpt)) or len(seen) >= 8, 180, "8 TF saves")
    _wait(daemon, "tfquiet", lambda: len(tf_ckpts(ckpt)) <= 3, 15, "rotation down to keep_last 2 (+1 in flight)")
    for p, h in keep.items():
        assert _sha(p) == h, f"{p.name} changed or vanished under a {QUOTA}-byte quota"
    daemon.cli("stop", "tfquiet", "--no-save")
