"""Checkpoints whose unpickling would run code: the daemon indexes them (valid or not by
structure) and never loads them, nor imports torch; the canary file never appears."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import wait_for
from trainsup.checkpoint import write_checkpoint


def _evil_pickle(canary: Path) -> bytes:
    # Protocol 0 by hand: unpickling calls os.system("touch <canary>").
    return b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR."


def _evil_torch_zip(canary: Path) -> bytes:
    """The layout torch.save writes (archive/data.pkl, version, byteorder), stored."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _evil_pickle(canary))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def test_payload_really_would_run(tmp_path):
    """Proof the payloads are live: loading one in a throwaway process makes its canary."""
    probe = tmp_path / "probe-canary"
    (tmp_path / "p.pkl").write_bytes(_evil_pickle(probe))
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.load(open(sys.argv[1],'rb'))",
                    str(tmp_path / "p.pkl")], check=True, timeout=30)
    assert probe.exists()
    probe.unlink()
    with zipfile.ZipFile(io.BytesIO(_evil_torch_zip(probe))) as z:
        subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                       input=z.read("archive/data.pkl"), check=True, timeout=30)
    assert probe.exists()


def test_daemon_indexes_but_never_loads_malicious_checkpoints(daemon):
    canary = daemon.root / "CANARY-pwned"
    ck = daemon.root / "evil-ckpt"
    ck.mkdir()
    (ck / "model-100.pt").write_bytes(_evil_torch_zip(canary))          # structurally valid torch zip
    (ck / "legacy-50.ckpt").write_bytes(_evil_pickle(canary))          # legacy pickle: invalid
    write_checkpoint(ck, 200, {"state.pt": _evil_torch_zip(canary)})   # valid trainsup dir
    hf = ck / "checkpoint-300"
    hf.mkdir()
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 300}))
    (hf / "pytorch_model.bin").write_bytes(_evil_torch_zip(canary))
    (hf / "optimizer.pt").write_bytes(_evil_pickle(canary))            # hf dir with a non-zip: invalid
    daemon.fakejob("evil", "--catch-usr1", ckpt=False, extra=f"checkpoint:\n  dir: {ck}\n  keep_last: 5\n")
    daemon.start()
    start = daemon.wait_ready("evil")
    listing = wait_for(lambda: (r := daemon.request("checkpoints", "evil"))["ok"] and len(r["result"]) >= 3
                       and r["result"], 15, "the index of the evil dir")
    by_name = {Path(c["path"]).name: c for c in listing}
    assert by_name["model-100.pt"]["valid"] is True
    # The legacy pickle is invalid (not a zip) and older than the newest valid one: rotation
    # removes it first, with a record; or it is still listed as invalid.
    if "legacy-50.ckpt" in by_name:
        assert by_name["legacy-50.ckpt"]["valid"] is False and by_name["legacy-50.ckpt"]["invalid_reason"]
    else:
        assert any(e["kind"] == "deleted" and e["path"].endswith("legacy-50.ckpt") for e in daemon.history("evil"))
    assert by_name["step-00000200"]["valid"] is True
    assert by_name["checkpoint-300"]["valid"] is False
    assert start["resume"] == str(ck / "step-00000200")      # newest valid; the job, not the daemon, loads it
    # A save the job makes now is indexed too (its step restarts low: the job cannot read
    # the evil dir's state, so `--wait`, which confirms only a step past 200, is not used).
    assert daemon.request("checkpoint", "evil")["ok"]
    wait_for(lambda: any(r["event"] == "saved" for r in daemon.records("evil")), 10, "the job's own save")
    wait_for(lambda: len(daemon.request("checkpoints", "evil")["result"]) > len(listing), 10,
             "the new save indexed next to the evil entries")
    daemon.request("stop", "evil", no_save=True)
    assert not canary.exists(), "a checkpoint was unpickled"
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    assert "torch" not in maps, "the daemon imported torch"
