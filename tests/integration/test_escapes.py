"""Job-controlled text printed to people and logs (issue 20): control characters escaped,
bytes that are not UTF-8 replaced, by one function (trainsup.printable).

Found: file names with terminal escape sequences were printed raw to root's terminal by
`trainsup checkpoints` (and in `history`); newlines in a manifest's `reason` forged lines in
root's daemon log; a job file named with non-UTF-8 bytes broke every metrics scrape.
"""

from __future__ import annotations

import io
import json
import os
import urllib.request
import zipfile
from pathlib import Path

from conftest import wait_for
from trainsup.checkpoint import write_checkpoint
from trainsup.printable import printable

ESC_NAME = "step_1\x1b]0;owned\x07\x1b[2J\u202e.pt"        # title, clear screen, bidi override
FORGED = "2030-01-01 00:00:00,000 ERROR trainsup.daemon: forged by a job"


def _torch_zip(step: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", json.dumps({"step": step}).encode())
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def test_printable_table():
    assert printable("plain text, ünïcödé") == "plain text, ünïcödé"
    assert printable("a\nb\tc\x1b[2J\x07") == "a\\x0ab\\x09c\\x1b[2J\\x07"
    assert printable("x\u202ey\x9b") == "x\\u202ey\\x9b"
    assert printable(os.fsdecode(b"job\xff\xfe")) == "job\ufffd\ufffd"
    assert printable(Path("/a\nb")) == "/a\\x0ab"


def test_checkpoint_names_with_terminal_escapes_are_escaped_in_checkpoints(daemon):
    ck = daemon.root / "esc-ckpt"
    ck.mkdir()
    daemon.write_job("esc", f"name: esc\ncommand: [sleep, '3600']\nworkdir: /\ncheckpoint: {{dir: {ck}, format: torch}}\n")
    daemon.start()
    daemon.wait_state("esc", "running")
    (ck / ESC_NAME).write_bytes(_torch_zip(1))
    # (a manifest's `reason` is the job's text too: test_newline_in_a_manifest_reason_...)
    wait_for(lambda: any(c["path"].endswith(ESC_NAME) for c in daemon.request("checkpoints", "esc")["result"]),
             15, "the entry indexed")
    r = daemon.cli("checkpoints", "esc")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout, repr(r.stdout)
    assert "step_1\\x1b]0;owned\\x07\\x1b[2J\\u202e.pt" in r.stdout, r.stdout
    assert "\x1b" not in daemon.log_text()


def test_newline_in_a_manifest_reason_does_not_forge_daemon_log_lines(daemon):
    ck = daemon.root / "forge-ckpt"
    daemon.write_job("forge", f"name: forge\ncommand: [sleep, '3600']\nworkdir: /\ncheckpoint: {{dir: {ck}}}\n")
    daemon.start()
    daemon.wait_state("forge", "running")
    stage = daemon.root / "stage"
    entry = write_checkpoint(stage, 1, {"w.bin": b"x" * 100})
    m = json.loads((entry / "MANIFEST.json").read_text())
    m["reason"] = f"periodic\n{FORGED}"                          # written by hand: any text
    (entry / "MANIFEST.json").write_text(json.dumps(m))
    ck.mkdir(exist_ok=True)
    os.rename(entry, ck / entry.name)
    # A reason that is not one of the documented words makes the manifest invalid: the
    # job's text goes nowhere (not the log, not history), and the entry says why.
    infos = wait_for(lambda: [c for c in daemon.request("checkpoints", "forge")["result"] if c["step"] == 1], 15,
                     "the entry indexed")
    assert not infos[0]["valid"] and "reason is not one of" in infos[0]["invalid_reason"], infos
    lines = daemon.log_text().splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:20])], "a job forged a line of the daemon's log"
    assert "forged by a job" not in daemon.log_text()
    r = daemon.cli("history", "forge")
    assert not [line for line in r.stdout.splitlines() if line.startswith(FORGED[:10])], r.stdout


def test_job_file_named_with_non_utf8_bytes_keeps_every_metrics_scrape_working(daemon):
    config = daemon.root / "trainsup.yaml"
    config.write_text("metrics:\n  listen: 127.0.0.1:0\n")
    daemon.fakejob("fine", ckpt=False)
    bad = os.path.join(os.fsencode(daemon.jobs), b"bad\xff\xfename.yaml")
    with open(bad, "wb") as f:
        f.write(b"name: [not, a, name]\ncommand: [x]\n")            # invalid: named after its file
    daemon.start("--config", str(config))
    listen = daemon.request("status")["result"]["daemon"]["metrics"]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
            assert resp.status == 200
            return resp.read().decode("utf-8")                     # strict: it is UTF-8
    body = wait_for(lambda: 'name="fine"' in (b := scrape()) and b, 15, "the jobs in a scrape")
    assert 'name="bad\ufffd\ufffdname"' in body, body[:3000]
    st = daemon.request("status")["result"]
    names = [j["name"] for j in st["jobs"]]
    assert "bad\ufffd\ufffdname" in names, names
    r = daemon.cli("status")
    assert "bad\ufffd\ufffdname" in r.stdout and r.returncode in (0, 3), (r.returncode, r.stdout, r.stderr)
