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


_TEN_A_SECOND = r"""
import os, sys, time
from trainsup.checkpoint import write_checkpoint
ck, log, n = os.environ["TRAINSUP_CHECKPOINT_DIR"], sys.argv[1], int(sys.argv[2])
blob = os.urandom(1 << 20)
for step in range(1, n + 1):
    t = time.monotonic()
    write_checkpoint(ck, step, {"w.bin": blob})
    with open(log, "a") as f:
        f.write(f"{step} {time.time()}\n")
    time.sleep(max(0.0, 0.1 - (time.monotonic() - t)))
time.sleep(3600)
"""


def _held(ck) -> int:
    """Bytes of committed entries in the dir, read off the disk (what the quota limits)."""
    total = 0
    for e in os.scandir(ck):
        if e.name.startswith("step-"):
            for dirpath, _, files in os.walk(e.path):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except FileNotFoundError:
                        pass
    return total


def test_quota_applied_as_soon_as_a_new_entry_puts_the_dir_over_it(daemon):
    """Found: the quota was applied on a 1 s tick: a job saving ten 1 MiB checkpoints a
    second under `quota: 4MiB` held 8.5 MB two seconds after its 12th save."""
    import sys
    from pathlib import Path
    ck, log = daemon.root / "q-ckpt", daemon.root / "saves"
    code = daemon.root / "ten.py"
    code.write_text(_TEN_A_SECOND)
    quota, entry = 4 << 20, (1 << 20) + 1024          # an entry: the blob and its manifest
    daemon.write_job("q", f"name: q\ncommand: [{sys.executable}, {code}, {log}, '40']\nworkdir: {daemon.root}\n"
                          f"env: {{PYTHONPATH: {json.dumps(str(Path(__file__).resolve().parents[2]))}}}\n"
                          f"checkpoint: {{dir: {ck}, quota: 4MiB, keep_best: 0}}\nemergency_save: {{grace: 0s}}\n")
    daemon.start()
    saves = lambda: len(log.read_text().splitlines()) if log.exists() else 0   # noqa: E731
    wait_for(lambda: saves() >= 12, 30, "the 12th save")
    samples = []
    while saves() < 40:
        samples.append(_held(ck))
        import time
        time.sleep(0.01)
    # Between a save landing and its pass, one entry more than the quota is on disk; on a
    # busy machine the pass may trail a save or two. A 1 s tick let ten entries pile up.
    samples.sort()
    assert samples[len(samples) // 2] <= quota + entry, f"median {samples[len(samples) // 2]} bytes"
    over = [s for s in samples if s > quota + 3 * entry]
    assert len(over) <= len(samples) // 10, (f"{len(over)}/{len(samples)} samples held more than quota + three "
                                              f"entries (max {max(samples)} bytes)")
    wait_for(lambda: _held(ck) <= quota, 5, f"the quota after the last save (held {_held(ck)})")
    assert not (daemon.status("q")["checkpoint"] or {}).get("over_quota")


def test_pin_right_after_start_waits_for_the_first_scan(daemon):
    """Found: `pin` in the first second after start answered "job j has no checkpoint at
    step 1" while the first scan ran. Many checkpoints already on disk: each verdict is
    computed (and its files flushed) on the first scan."""
    from trainsup.checkpoint import write_checkpoint
    ck = daemon.root / "p-ckpt"
    for step in range(1, 301):
        write_checkpoint(ck, step, {"w.bin": b"%d" % step})
    daemon.write_job("p", f"name: p\ncommand: [sleep, '3600']\nworkdir: /\n"
                          f"checkpoint: {{dir: {ck}, keep_last: 1000}}\n")
    daemon.start()
    r = daemon.request("pin", "p", step=1)
    assert r["ok"], r
    assert r["result"]["pinned"] == [1]
