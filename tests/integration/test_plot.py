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
    assert img.shape[:2] == (750, 1000)             # 10 x 7.5 inches at 100 dpi (steps, then goodput)
    assert img.std() > 0.05                          # not a blank canvas


def test_plot_figure_axes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from trainsup.cli.plot import figure
    rec = json.loads(RECORDED.read_text())
    fig = figure(rec["events"], job="run", quota=rec["quota"])
    steps, breakdown, disk = fig.axes
    assert steps.get_ylabel() == "step" and breakdown.get_xlabel() == "time (UTC)"
    assert disk.get_ylabel() == "checkpoint disk use (KiB)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    for want in ("first launch", "relaunch after a crash", "crash", "resume", "requested save",
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


# ---------------------------------------------------------------- a picture a person can trust

def test_plot_legend_names_each_kind_once_not_each_attempt():
    import matplotlib
    matplotlib.use("Agg")
    from trainsup.cli.plot import figure
    rec = json.loads(RECORDED.read_text())
    fig = figure(rec["events"], job="run", quota=rec["quota"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    # four attempts, three kinds (first, two crashes, one manual start): three entries
    assert not [l for l in labels if l.startswith("attempt ")], labels
    assert [l for l in labels if l in ("first launch", "relaunch after a crash", "started by hand")] == [
        "first launch", "relaunch after a crash", "started by hand"], labels
    assert len(labels) == len(set(labels)), labels
    matplotlib.pyplot.close(fig)


def test_plot_lost_steps_are_shaded_visibly_and_downtime_is_marked():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.collections import PolyCollection
    from trainsup.cli.plot import figure
    rec = json.loads(RECORDED.read_text())
    fig = figure(rec["events"], job="run", quota=rec["quota"])
    steps = fig.axes[0]
    lo, hi = steps.get_xlim()
    lost = [c for c in steps.collections if isinstance(c, PolyCollection) and c.get_hatch()]
    assert len(lost) == 2                                   # the two SIGKILLs
    for c in lost:
        xs = c.get_paths()[0].vertices[:, 0]
        assert (xs.max() - xs.min()) >= 0.005 * (hi - lo)    # wide enough to see on the run's scale
        assert c.get_alpha() >= 0.3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "down (exit to relaunch)" in labels and "steps lost" in labels
    assert steps.get_title().endswith("116 steps lost")     # = the launches' steps_lost (48 + 0 + 68)
    matplotlib.pyplot.close(fig)


def test_plot_goodput_panel_stacks_the_breakdown(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from trainsup.cli.plot import figure
    from trainsup.daemon.goodput import goodput
    rec = json.loads(RECORDED.read_text())
    fig = figure(rec["events"], job="run", quota=rec["quota"])
    breakdown = fig.axes[1]
    end = max(e["at"] for e in rec["events"])
    g = goodput(rec["events"], end)
    assert breakdown.get_title().startswith(f"goodput {g.ratio * 100:.0f}%")
    stacked = [c.get_label() for c in breakdown.collections]
    assert stacked[0] == "goodput: productive" and "goodput: recomputed" in stacked, stacked
    matplotlib.pyplot.close(fig)


def test_plot_without_matplotlib_prints_the_install_hint_not_a_traceback(tmp_path):
    # A matplotlib that cannot be imported, first on the path (the real one is installed here).
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'shadow'}:{REPO}")
    r = subprocess.run([sys.executable, "-m", "trainsup", "plot", "run", "--history", str(RECORDED),
                        "-o", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=scaled(120), env=env)
    assert r.returncode == 1, r
    assert r.stderr.strip() == "trainsup: trainsup plot needs matplotlib: pip install 'trainsup[plot]'", r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.png").exists()


def test_plot_of_a_history_cut_short_still_draws_what_it_has():
    """`history --json` prints the newest 50 events by default: the first launch is not among
    them. The picture draws the attempt that was running and says the history starts mid-run."""
    import matplotlib
    matplotlib.use("Agg")
    from trainsup.cli.plot import figure, timeline
    rec = json.loads(RECORDED.read_text())
    tail = [e for e in rec["events"] if e["at"] > rec["events"][2]["at"]][-20:]
    assert tail[0]["kind"] != "launch"
    tl = timeline(tail)
    assert tl.partial and tl.has_steps
    fig = figure(tail, job="run")
    assert fig.axes[0].get_title().endswith("(history starts mid-run)")
    matplotlib.pyplot.close(fig)
