"""`trainsup plot`: one picture of a run, drawn from the job's history.

Steps over wall time, one line per attempt; marks for requested saves, notices, crashes
and resumes; the steps each interruption cost shaded; checkpoint disk use against the
quota on a second axis. `timeline()` turns events into plain numbers (tested without
matplotlib); `draw()` needs the optional extra `trainsup[plot]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any

_STEP_IN_NAME = re.compile(r"(?:step-|checkpoint-|step_|step)(\d+)")
CLEAN_EXITS = ("exit 0",)


class PlotUnavailable(Exception):
    pass


@dataclass
class Attempt:
    number: int
    start: float
    reason: str
    resume_step: int | None = None
    end: float | None = None
    exit_reason: str | None = None
    crashed: bool = False
    points: list[tuple[float, int]] = field(default_factory=list)     # (at, step)


@dataclass
class Timeline:
    attempts: list[Attempt] = field(default_factory=list)
    saves: list[tuple[float, int | None]] = field(default_factory=list)        # requested saves
    notices: list[tuple[float, str, str]] = field(default_factory=list)           # (at, source, outcome)
    lost: list[tuple[float, float, int, int]] = field(default_factory=list)       # (t0, t1, from, to)
    disk: list[tuple[float, int]] = field(default_factory=list)                   # (at, bytes)
    reported_steps: bool = False          # exits carry the job's own last step

    @property
    def has_steps(self) -> bool:
        return any(a.points for a in self.attempts)


def step_of(path: str | None, known: dict[str, int]) -> int | None:
    if not path:
        return None
    if path in known:
        return known[path]
    m = _STEP_IN_NAME.search(Path(path).name)
    return int(m.group(1)) if m else None


def timeline(events: Iterable[dict[str, Any]]) -> Timeline:
    """Events (oldest first, as `trainsup history --json` prints them) -> a Timeline."""
    tl = Timeline()
    steps_of_path: dict[str, int] = {}
    sizes: dict[str, int] = {}
    current: Attempt | None = None
    for ev in events:
        at, kind = float(ev["at"]), ev.get("kind")
        if kind == "launch":
            resume = step_of(ev.get("resume_from"), steps_of_path)
            current = Attempt(int(ev.get("attempt") or len(tl.attempts) + 1), at, str(ev.get("reason")), resume)
            if resume is not None:
                current.points.append((at, resume))
            tl.attempts.append(current)
        elif kind == "checkpoint":
            path, step = ev.get("path"), ev.get("step")
            if path and isinstance(step, int):
                steps_of_path[path] = step
            if path and isinstance(ev.get("bytes"), int):
                sizes[path] = ev["bytes"]
                tl.disk.append((at, sum(sizes.values())))
            if current is not None and isinstance(step, int) and current.end is None:
                current.points.append((at, step))
            if ev.get("took_s") is not None:
                tl.saves.append((at, step if isinstance(step, int) else None))
        elif kind == "deleted":
            if sizes.pop(str(ev.get("path")), None) is not None:
                tl.disk.append((at, sum(sizes.values())))
        elif kind == "notice":
            tl.notices.append((at, str(ev.get("source")), str(ev.get("outcome"))))
        elif kind == "exit" and current is not None:
            current.end = at
            current.exit_reason = str(ev.get("reason"))
            if isinstance(ev.get("last_step"), int):      # the job reported its step
                current.points.append((at, ev["last_step"]))
                tl.reported_steps = True
        elif kind == "state" and current is not None and ev.get("to") == "backoff":
            current.crashed = current.exit_reason not in CLEAN_EXITS
        elif kind == "spawn-failed" and current is not None:
            current.crashed = True
    # Steps lost: the work an attempt did past the checkpoint the next attempt resumed
    # from, shaded until the next attempt has redone it.
    for prev, nxt in zip(tl.attempts, tl.attempts[1:]):
        reached = max((s for _, s in prev.points), default=None)
        back_to = nxt.resume_step if nxt.resume_step is not None else 0
        if reached is None or reached <= back_to or prev.end is None:
            continue
        redone = next((t for t, s in nxt.points if s >= reached), nxt.end or (nxt.points[-1][0] if nxt.points else nxt.start))
        tl.lost.append((prev.end, redone, back_to, reached))
    return tl


def _when(t: float) -> float:
    """Epoch seconds -> matplotlib's date number (days), so a date axis formats it."""
    return t / 86400.0


def draw(events: list[dict[str, Any]], out: Path, *, job: str, quota: int | None = None,
         now: float | None = None) -> Path:
    """Write the picture (PNG or SVG, by the suffix of `out`)."""
    import matplotlib.pyplot as plt
    fig = figure(events, job=job, quota=quota, now=now)
    out = Path(out)
    try:
        fig.savefig(out, format="svg" if out.suffix.lower() == ".svg" else "png")
    finally:
        plt.close(fig)
    return out


def figure(events: list[dict[str, Any]], *, job: str, quota: int | None = None,
           now: float | None = None) -> Any:
    """The matplotlib Figure: axes[0] steps over time, axes[1] disk use (MiB etc.)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("trainsup plot needs matplotlib: pip install 'trainsup[plot]'") from None
    tl = timeline(events)
    if not events:
        raise ValueError(f"job {job} has no history to draw")
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (t0, t1, lo, hi) in tl.lost:
        ax.fill_between([_when(t0), _when(t1)], lo, hi, color="tab:red", alpha=0.15, linewidth=0,
                        label="steps lost" if t0 == tl.lost[0][0] else None)
    for i, a in enumerate(tl.attempts):
        if not a.points:
            continue
        xs = [t for t, _ in a.points]
        ys = [s for _, s in a.points]
        colour = colours[i % len(colours)]
        ax.plot([_when(x) for x in xs], ys, "-o", color=colour, markersize=3, linewidth=1.5,
                label=f"attempt {a.number} ({a.reason})")
        if a.resume_step is not None:
            ax.plot([_when(a.start)], [a.resume_step], marker="^", color="tab:green", markersize=9,
                    linestyle="none", label="resume" if i == _first(tl.attempts, "resume") else None)
        if a.crashed and a.end is not None:
            ax.plot([_when(a.end)], [ys[-1]], marker="X", color="tab:red", markersize=10,
                    linestyle="none", label="crash" if i == _first(tl.attempts, "crash") else None)
    saved = [(t, s) for t, s in tl.saves if s is not None]
    if saved:
        ax.plot([_when(t) for t, _ in saved], [s for _, s in saved], marker="s", markersize=8,
                markerfacecolor="none", markeredgecolor="black", linestyle="none", label="requested save")
    for k, (t, source, outcome) in enumerate(tl.notices):
        ax.axvline(_when(t), color="tab:purple", linestyle="--", linewidth=1,
                   label="notice" if k == 0 else None)
        ax.annotate(f"{source}: {outcome}", (_when(t), 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color="tab:purple")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("step")
    ax.xaxis_date(tz=timezone.utc)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    lost = sum(hi - lo for _, _, lo, hi in tl.lost)
    ax.set_title(f"{job}: {_count(len(tl.attempts), 'attempt')}, {_count(len(tl.saves), 'requested save')}, "
                 f"{_count(lost, 'step')} lost" + ("" if tl.reported_steps else " (the job reports no steps)"))
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    unit, scale = _bytes_unit(max([b for _, b in tl.disk] + [quota or 0]))
    if tl.disk:
        end = now if now is not None else max(float(e["at"]) for e in events)
        dxs = [_when(t) for t, _ in tl.disk] + [_when(end)]
        dys = [b / scale for _, b in tl.disk] + [tl.disk[-1][1] / scale]
        ax2.step(dxs, dys, where="post", color="tab:gray", linewidth=1, label="checkpoint disk use")
    if quota:
        ax2.axhline(quota / scale, color="tab:gray", linestyle=":", linewidth=1.5, label="quota")
    ax2.set_ylabel(f"checkpoint disk use ({unit})")
    ax2.set_ylim(bottom=0, top=max(ax2.get_ylim()[1], (quota or 0) / scale * 1.1))
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.autofmt_xdate()
    fig.legend(handles + h2, labels + l2, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _bytes_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0


def _first(attempts: list[Attempt], what: str) -> int:
    for i, a in enumerate(attempts):
        if not a.points:
            continue
        if what == "resume" and a.resume_step is not None:
            return i
        if what == "crash" and a.crashed and a.end is not None:
            return i
    return -1
