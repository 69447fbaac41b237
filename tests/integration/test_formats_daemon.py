"""Regressions for issue 12's late confirmation, under a real daemon with a job that saves
like Hugging Face Trainer (checkpoint-N/ first, trainer_state.json last, inside the dir)."""

from __future__ import annotations

import json
import sys
import time

from conftest import REPO, wait_for

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
    new = _saved(daemon, "hf")[-1]
    assert r["result"]["step"] == new["step"] > 5
    # the completion is trainer_state.json inside checkpoint-N/: seen by its event, not a rescan
    assert returned - new["state_at"] <= 1.0, f"confirmed {returned - new['state_at']:.2f}s after the save"


def test_preempt_never_confirms_with_an_older_step(daemon):
    # On the request an old, complete checkpoint-92 appears (hour-old mtimes) before the real
    # save at step > 600 finishes 1.5 s later: the preempt must wait for the real one.
    _job(daemon, "pre", "--start-step 600 --inner-delay 1.5 --stale 92")
    daemon.start()
    daemon.wait_ready("pre")
    wait_for(lambda: any(c["valid"] for c in _indexed(daemon, "pre")), 10, "checkpoint-600 indexed valid")
    r = daemon.request("preempt", "pre", grace=20)
    assert r["ok"], r
    out = r["result"]
    saved = [s for s in _saved(daemon, "pre") if s["step"] > 600]
    assert out["outcome"] == "saved" and saved and out["step"] == saved[-1]["step"], out
    # checkpoint-92 was indexed valid meanwhile: found, and still not taken as the save
    assert any(e.get("kind") == "checkpoint" and e.get("step") == 92 for e in daemon.history("pre"))


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
