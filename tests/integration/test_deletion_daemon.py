"""Issue 11, through a real daemon: what a user sees when a checkpoint dir is the wrong
dir (home-like workdir, shared with another job) and when all jobs share a disk_quota."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import wait_for


def _ckpts(d, job):
    r = d.request("checkpoints", job)
    assert r["ok"], r
    return r["result"]


def _user_files(home: Path) -> dict:
    """The user's files under home, never descending into the job's own entries: rotation
    may still be deleting one after `stop` (a pass in flight), and a walk into it failed
    with FileNotFoundError in CI."""
    out = {}
    for root, dirs, files in os.walk(home):
        if Path(root) == home:
            dirs[:] = [d for d in dirs if not d.startswith(("step-", ".trainsup"))]
            files = [f for f in files if not f.startswith(("step-", ".trainsup"))]
        for f in files:
            p = Path(root) / f
            if p.suffix != ".rec":
                out[str(p.relative_to(home))] = p.read_bytes()
    return dict(sorted(out.items()))


def test_home_like_workdir_with_dir_dot_never_loses_user_files(daemon, tmp_path):
    """Case 3: `checkpoint.dir: .` in a workdir holding the user's own files: `auto` took
    every *.pt, numbered resnet50.pt as step 50 and rotated it (and a pretrained backbone)
    away."""
    home = tmp_path / "home-like"
    (home / ".cache" / "torch").mkdir(parents=True)
    (home / "resnet50.pt").write_bytes(b"downloaded weights" * 100)
    (home / "pretrained_backbone.pt").write_bytes(b"backbone" * 100)
    (home / ".cache" / "torch" / "vgg16.pth").write_bytes(b"cache" * 100)
    (home / "notes.txt").write_text("my notes")
    (home / "data").mkdir()
    (home / "data" / "train.bin").write_bytes(b"data" * 100)
    before = _user_files(home)
    daemon.fakejob("mine", "--every 0.05", ckpt=False,
                   extra="checkpoint:\n  dir: .\n  keep_last: 1\n  keep_best: 0\n")
    # the job's workdir is the home-like dir (fakejob writes `workdir: <root>` first)
    job = daemon.jobs / "mine.yaml"
    job.write_text(job.read_text().replace(f"workdir: {daemon.root}\n", f"workdir: {home}\n"))
    daemon.start()
    wait_for(lambda: len([e for e in daemon.history("mine") if e["kind"] == "deleted"]) >= 3, 20,
             "3 rotations in the home-like dir")
    daemon.request("stop", "mine", no_save=True)
    assert _user_files(home) == before
    listing = {Path(c["path"]).name: c for c in _ckpts(daemon, "mine")}
    assert listing["resnet50.pt"]["format"] == "unmanaged" and listing["resnet50.pt"]["kept"] == "unmanaged"
    assert not any(e["path"].endswith((".pt", ".pth", ".txt")) for e in daemon.history("mine")
                   if e["kind"] == "deleted")


def test_dirs_that_are_not_a_jobs_own_are_refused_with_file_line(daemon):
    """Case 3 (config): `/`, a home dir and the jobs dir were accepted as checkpoint dirs."""
    home = os.path.expanduser("~")
    for name, d in (("root", "/"), ("home", home), ("jobsdir", str(daemon.jobs))):
        daemon.fakejob(name, ckpt=False, extra=f"checkpoint:\n  dir: {d}\n")
    daemon.start()
    for name in ("root", "home", "jobsdir"):
        s = daemon.status(name)
        assert s["state"] == "invalid", s
    r = daemon.cli("validate", str(daemon.jobs / "root.yaml"), str(daemon.jobs / "home.yaml"))
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert any(f"{daemon.jobs / 'root.yaml'}:6: checkpoint.dir: `/` cannot be" in ln for ln in lines), lines
    assert any(f"{daemon.jobs / 'home.yaml'}:6: checkpoint.dir:" in ln and "home dir" in ln for ln in lines), lines


def test_two_jobs_sharing_a_dir_second_refused_first_keeps_its_newest(daemon):
    """Case 4: two jobs with one checkpoint.dir were accepted; A's rotation deleted B's
    newest checkpoint, the one B had resumed from."""
    shared = daemon.root / "shared-ckpt"
    daemon.fakejob("a", "--every 0.1", ckpt=False, extra=f"checkpoint:\n  dir: {shared}\n  keep_last: 1\n")
    daemon.fakejob("b", "--every 0.1", ckpt=False, extra=f"checkpoint:\n  dir: {shared}\n  keep_last: 1\n")
    daemon.start()
    s = daemon.status("b")
    assert s["state"] == "invalid", s
    r = daemon.cli("validate", str(daemon.jobs / "a.yaml"), str(daemon.jobs / "b.yaml"))
    out = r.stdout + r.stderr
    assert f"{daemon.jobs / 'b.yaml'}:6: checkpoint.dir: {shared} is also job 'a'" in out, out
    assert daemon.status("a")["state"] in ("running", "starting")


def test_disk_quota_applies_across_jobs(daemon):
    """Case 10: `disk_quota` was computed and discarded: two jobs under 1500 bytes kept
    10,512 bytes with no deletion and no over-quota."""
    cfg = daemon.root / "trainsupd.yaml"
    cfg.write_text("disk_quota: 1500\n")
    for n in ("q1", "q2"):
        daemon.fakejob(n, "--every 0.1", extra="  keep_last: 3\n  keep_best: 0\n")
    daemon.start("--config", str(cfg))

    def total() -> int:
        return sum(c["bytes"] for n in ("q1", "q2") for c in _ckpts(daemon, n) if c["format"] != "unmanaged")
    wait_for(lambda: all(len([c for c in _ckpts(daemon, n) if c["valid"]]) >= 1 for n in ("q1", "q2"))
             and any("disk_quota" in (e.get("why") or "") for n in ("q1", "q2") for e in daemon.history(n)),
             30, "a deletion for disk_quota")
    for n in ("q1", "q2"):
        daemon.request("stop", n, no_save=True)
    daemon.request("checkpoints", "q1")      # a rescan + pass after the last save
    wait_for(lambda: total() <= 1500, 20, "both jobs together within disk_quota")
    for n in ("q1", "q2"):
        assert any(c["valid"] and c["kept"] == "newest" for c in _ckpts(daemon, n))


def test_checkpoint_named_files_there_before_first_launch_are_never_deleted(daemon, tmp_path):
    """Case 3: entries the format would name (model_epoch_3.pt, step-00000001) that were
    in the dir before the job's first launch are the user's, not the job's."""
    ck = daemon.root / "pre-ckpt"
    ck.mkdir()
    (ck / "model_epoch_3.pt").write_bytes(b"someone else's run" * 50)
    from trainsup.checkpoint import write_checkpoint
    write_checkpoint(ck, 1, {"w": b"imported"})
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}
    daemon.fakejob("pre", "--every 0.05", ckpt=False,
                   extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n")
    daemon.start()
    wait_for(lambda: len([e for e in daemon.history("pre") if e["kind"] == "deleted"]) >= 3, 20, "3 rotations")
    daemon.request("stop", "pre", no_save=True)
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before
    assert (ck / "step-00000001" / "w").read_bytes() == b"imported"
    kept = {Path(c["path"]).name: c["kept"] for c in _ckpts(daemon, "pre")}
    assert kept["model_epoch_3.pt"] == "preexisting" and kept["step-00000001"] == "preexisting"
    assert (daemon.state / "checkpoint-inventory" / "pre.json").exists()


def test_a_pass_before_the_first_launch_deletes_nothing_the_job_found(daemon):
    """Found: with a fresh state dir, the rotation pass that follows the daemon's first scan
    ran before the first launch had recorded the dir's inventory, and rotated away three of
    four checkpoints the job had never written. A job that is not started (autostart: false)
    makes that pass the only one: everything in its dir is `preexisting`, then and after
    the first launch."""
    from trainsup.checkpoint import write_checkpoint
    ck = daemon.root / "found-ckpt"
    for step in (10, 20, 30, 40):
        write_checkpoint(ck, step, {"state.json": b'{"step": %d}' % step})
    daemon.fakejob("found", "--catch-usr1", ckpt=False,
                   extra=f"autostart: false\ncheckpoint:\n  dir: {ck}\n  keep_last: 1\n  keep_best: 0\n")
    daemon.start()
    kept = wait_for(lambda: (k := {Path(c["path"]).name: c["kept"] for c in _ckpts(daemon, "found")})
                    and all(k.values()) and k, 20, "the first rotation pass's verdicts")
    assert kept == {"step-00000010": "preexisting", "step-00000020": "preexisting",
                    "step-00000030": "preexisting", "step-00000040": "newest"}, kept
    daemon.request("start", "found")
    daemon.wait_ready("found")
    daemon.request("checkpoints", "found")      # a rescan and a pass with the inventory on file
    kept = {Path(c["path"]).name: c["kept"] for c in _ckpts(daemon, "found")}
    assert kept["step-00000010"] == "preexisting", kept
    assert not [e for e in daemon.history("found") if e["kind"] in ("delete-intent", "deleted")]
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == [
        "step-00000010", "step-00000020", "step-00000030", "step-00000040"]
