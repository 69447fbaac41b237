"""`trainsup plot` on a recorded history (tests/integration/data/run_history.json, recorded
from a real daemon: periodic saves, a requested save, two SIGKILL crashes, a preemption
and a manual start)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled
from trainsup.cli.plot import timeline

REPO = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "run_history.json"

mpl = pytest.importorskip("matplotlib", reason="trainsup plot needs the optional extra trainsup[plot]")
import matplotlib.image  # noqa: E402  (only once importorskip found matplotlib)


def _plot(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "trainsup", "plot", *args], capture_output=True,
                          text=True, timeout=scaled(120), env=env)


def test_timeline_of_a_recorded_history():
    rec = json.loads(RECORDED.read_text())
    tl = timeline(rec["events"])
    assert [a.reason for a in tl.attempts] == ["first", "crash", "manual", "crash"]
    assert [a.crashed for a in tl.attempts] == [True, False, True, False]
    # Each relaunch resumed from the newest checkpoint the history shows before it.
    assert all(a.resume_step is not None for a in tl.attempts[1:])
    assert [s for _, s in tl.saves] == [365, 694]
    # The job reported its step: each SIGKILL lost the steps past the resumed checkpoint
    # (the launch events' steps_lost), the preemption lost none.
    assert tl.reported_steps
    assert [(lo, hi) for _, _, lo, hi in tl.lost] == [(435, 483), (843, 911)]
    launches = [e for e in rec["events"] if e["kind"] == "launch"]
    assert [e.get("steps_lost") for e in launches] == [None, 48, 0, 68]
    assert [(src, out) for _, src, out in tl.notices] == [("preempt", "saved")]
    # Disk use never goes negative and ends at what the newest events left.
    assert all(b >= 0 for _, b in tl.disk)


def test_plot_writes_a_png_with_steps_and_disk_axes(tmp_path):
    out = tmp_path / "run.png"
    r = _plot("run", "--history", str(RECORDED), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"run: wrote {out}"
    img = matplotlib.image.imread(str(out))
    assert img.shape[:2] == (550, 1000)             # 10 x 5.5 inches at 100 dpi
    assert img.std() > 0.05                          # not a blank canvas


def test_plot_figure_axes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from trainsup.cli.plot import figure
    rec = json.loads(RECORDED.read_text())
    fig = figure(rec["events"], job="run", quota=rec["quota"])
    steps, disk = fig.axes
    assert steps.get_ylabel() == "step" and steps.get_xlabel() == "time (UTC)"
    assert disk.get_ylabel() == "checkpoint disk use (KiB)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    for want in ("attempt 1 (first)", "attempt 4 (crash)", "crash", "resume", "requested save",
                 "notice", "checkpoint disk use", "quota"):
        assert want in labels, labels
    # The quota line sits at the quota (2000 bytes, in KiB) on the disk axis.
    quota_line = next(l for l in disk.get_lines() if l.get_label() == "quota")
    assert quota_line.get_ydata()[0] == pytest.approx(2000 / 1024)
    lo, hi = steps.get_ylim()
    assert lo <= 148 and hi >= 993
    assert steps.get_title() == "run: 4 attempts, 2 requested saves, 116 steps lost"
    matplotlib.pyplot.close(fig)


def test_plot_svg_and_bad_input(tmp_path):
    out = tmp_path / "run.svg"
    r = _plot("run", "--history", str(RECORDED), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()[:2000]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = _plot("run", "--history", str(bad), "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr
