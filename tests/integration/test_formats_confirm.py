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
    assert any(c["step"] == 92 and c["valid"] for c in _indexed(daemon, "pre"))  # it was there, valid
