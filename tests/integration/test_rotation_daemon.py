"""Rotation and quotas driven by the daemon (SPEC section 6), with planted symlinks."""

from __future__ import annotations

import json
import os

from conftest import wait_for


def _ckpts(d, job):
    r = d.cli("checkpoints", job, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["checkpoints"]


def test_rotation_keeps_last_n_and_never_follows_planted_symlinks(daemon, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.bin"
    canary.write_bytes(b"precious" * 1000)
    (outside / "step-dir").mkdir()
    (outside / "step-dir" / "inner").write_bytes(b"inner canary")
    ck = daemon.root / "rot-ckpt"
    ck.mkdir()
    os.symlink(canary, ck / "old.pt")                       # a file symlink that looks like a torch ckpt
    os.symlink(outside / "step-dir", ck / "step-00000001")  # a step dir that is a symlink
    daemon.fakejob("rot", "--every 0.05", ckpt=False, extra="checkpoint:\n  dir: rot-ckpt\n  keep_last: 2\n  keep_best: 0\n")
    daemon.start()
    wait_for(lambda: len([e for e in daemon.history("rot") if e["kind"] == "deleted"]) >= 5, 20, "5 deletions")
    daemon.request("stop", "rot", no_save=True)
    # passes are at least 1 s apart (no spinning): the one after the last save may trail
    listing = wait_for(lambda: (ls := _ckpts(daemon, "rot")) and all(c["kept"] for c in ls if c["valid"]) and ls,
                       10, "the rotation pass after the last save")
    valid = [c for c in listing if c["valid"]]
    assert len(valid) <= 3, listing          # keep_last 2 (+ one that landed since the last pass)
    assert {c["kept"] for c in valid} <= {"newest", "last", "resumed-from"}
    assert canary.read_bytes() == b"precious" * 1000
    assert (outside / "step-dir" / "inner").read_bytes() == b"inner canary"
    deleted = [e for e in daemon.history("rot") if e["kind"] == "deleted"]
    assert all(e["path"].startswith(str(ck)) for e in deleted)


def test_quota_smaller_than_one_checkpoint_is_over_quota_and_keeps_newest(daemon):
    daemon.fakejob("tiny", "--every 0.1",
                   ckpt=False, extra="checkpoint:\n  dir: tiny-ckpt\n  keep_last: 3\n  quota: 10\n")
    daemon.start()
    wait_for(lambda: (daemon.status("tiny")["checkpoint"] or {}).get("over_quota"), 20, "over-quota")
    wait_for(lambda: len([e for e in daemon.history("tiny") if e["kind"] == "deleted"]) >= 2, 20, "deletions")
    r = daemon.cli("status")
    assert r.returncode == 3, r.stdout
    assert "over-quota" in r.stdout
    listing = _ckpts(daemon, "tiny")
    assert any(c["valid"] and c["kept"] == "newest" for c in listing)


def test_pin_protects_a_checkpoint(daemon):
    daemon.fakejob("pinned", "--every 0.7", ckpt=False, extra="checkpoint:\n  dir: pinned-ckpt\n  keep_last: 1\n  keep_best: 0\n")
    daemon.start()
    def pin_newest():
        # the newest may be rotated away between listing and pinning (keep_last 1, a save
        # every 0.7 s, a CLI start on a loaded machine): pin one that is still there
        valid = [c for c in _ckpts(daemon, "pinned") if c["valid"]]
        return valid and daemon.cli("pin", "pinned", str(valid[-1]["step"])).returncode == 0 and valid[-1]
    first = wait_for(pin_newest, 20, "a checkpoint pinned")
    wait_for(lambda: len([e for e in daemon.history("pinned") if e["kind"] == "deleted"]) >= 3, 20, "rotation")
    kept = {c["step"]: c["kept"] for c in _ckpts(daemon, "pinned")}
    assert kept.get(first["step"]) == "pinned"
    r = daemon.cli("pin", "pinned", "999999")
    assert r.returncode == 1 and "no checkpoint at step 999999" in r.stderr
