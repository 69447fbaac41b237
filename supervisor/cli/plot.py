"""`trainsup plot`: one picture of a run, drawn from the job's history.

Top: steps over wall time, one line per attempt coloured by how it was launched (the
legend names each kind once: first launch, after a crash, after a preemption...); marks
for requested saves, notices, crashes and resumes; the steps each interruption cost
shaded red; the time the job was down (exit to relaunch) shaded grey and its start-up or
resume (launch to first step) lighter; checkpoint disk use against the quota on a second axis.
Bottom: goodput, where the wall time since the first launch went, stacked by part
(daemon/goodput.py). `timeline()` turns events into plain numbers (tested without
matplotlib); `figure()`/`draw()` need the optional extra `trainsup[plot]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any

from ..daemon import goodput as gp

_STEP_IN_NAME = re.compile(r"(?:step-|checkpoint-|step_|step)(\d+)")
CLEAN_EXITS = ("exit 0",)
INSTALL_HINT = "trainsup plot needs matplotlib: pip install 'trainsup[plot]'"

# How an attempt was launched (the launch event's reason) -> its legend entry and colour.
KINDS = {
    "first": ("first launch", "tab:blue"),
    "crash": ("relaunch after a crash", "tab:orange"),
    "oom": ("relaunch after an OOM", "tab:brown"),
    "hang": ("relaunch after a hang", "tab:olive"),
    "preempt": ("relaunch after a preemption", "tab:cyan"),
    "manual": ("started by hand", "tab:pink"),
    "earlier": ("before this history", "tab:gray"),
}
PART_COLOURS = {
    gp.PRODUCTIVE: "tab:green", "recomputed": "tab:red", "resume": "tab:olive", "restart": "tab:gray",
    "backoff": "tab:orange", "save_emergency": "tab:purple", "save_periodic": "tab:pink", "queue": "tab:cyan",
}


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
    first_step: float | None = None                                   # when it trained again
    steps_lost: int | None = None                                     # the launch event's figure
    points: list[tuple[float, int]] = field(default_factory=list)     # (at, step)


@dataclass
class Timeline:
    attempts: list[Attempt] = field(default_factory=list)
    saves: list[tuple[float, int | None]] = field(default_factory=list)        # requested saves
    notices: list[tuple[float, str, str]] = field(default_factory=list)           # (at, source, outcome)
    lost: list[tuple[float, float, int, int]] = field(default_factory=list)       # (t0, t1, from, to)
    disk: list[tuple[float, int]] = field(default_factory=list)                   # (at, bytes)
    reported_steps: bool = False          # exits carry the job's own last step
    partial: bool = False                 # the history starts after the job's first launch

    @property
    def has_steps(self) -> bool:
        return any(a.points for a in self.attempts)

    @property
    def steps_lost(self) -> int:
        return sum(hi - lo for _, _, lo, hi in self.lost)

    def down(self) -> list[tuple[float, float]]:
        """(exit, next launch) of each gap between attempts."""
        return [(a.end, b.start) for a, b in zip(self.attempts, self.attempts[1:]) if a.end is not None]


def step_of(path: str | None, known: dict[str, int]) -> int | None:
    if not path:
        return None
    if path in known:
        return known[path]
    m = _STEP_IN_NAME.search(Path(path).name)
    return int(m.group(1)) if m else None


def timeline(events: Iterable[dict[str, Any]]) -> Timeline:
    """Events (oldest first, as `trainsup history --all --json` prints them) -> a Timeline."""
    tl = Timeline()
    steps_of_path: dict[str, int] = {}
    sizes: dict[str, int] = {}
    current: Attempt | None = None
    for ev in events:
        at, kind = float(ev["at"]), ev.get("kind")
        if current is None and not tl.attempts and kind in ("checkpoint", "exit", "first-step"):
            # A history cut short (history's -n): the attempt running when it starts.
            current = Attempt(0, at, "earlier")
            tl.attempts.append(current)
            tl.partial = True
        if kind == "launch":
            resume = ev.get("resume_step") if isinstance(ev.get("resume_step"), int) else None
            if resume is None:
                resume = step_of(ev.get("resume_from"), steps_of_path)
            current = Attempt(int(ev.get("attempt") or len(tl.attempts) + 1), at, str(ev.get("reason")), resume,
                              steps_lost=ev.get("steps_lost") if isinstance(ev.get("steps_lost"), int) else None)
            if current.number > 1 and not tl.attempts:
                tl.partial = True
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
            # When the notice came (recorded once its flow was over).
            tl.notices.append((float(ev.get("noticed_at") or at), str(ev.get("source")), str(ev.get("outcome"))))
        elif kind == "first-step" and current is not None and current.first_step is None:
            current.first_step = at
            if isinstance(ev.get("step"), int):
                current.points.append((at, ev["step"]))
                tl.reported_steps = True
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
    # from, shaded until the next attempt has redone it. The launch's own steps_lost (what
    # the daemon counted, and what `history`, metrics and the demo report) wins.
    for prev, nxt in zip(tl.attempts, tl.attempts[1:]):
        back_to = nxt.resume_step if nxt.resume_step is not None else 0
        if nxt.steps_lost is not None:
            reached = back_to + nxt.steps_lost
        else:
            reached = max((s for _, s in prev.points), default=back_to)
        if reached <= back_to or prev.end is None:
            continue
        redone = next((t for t, s in nxt.points if s >= reached), nxt.end or (nxt.points[-1][0] if nxt.points else nxt.start))
        tl.lost.append((prev.end, redone, back_to, reached))
    return tl


def _when(t: float) -> float:
    """Epoch seconds -> matplotlib's date number (days), so a date axis formats it."""
    return t / 86400.0


def draw(events: list[dict[str, Any]], out: Path, *, job: str, quota: int | None = None,
         now: float | None = None) -> Path:
    """Write the picture (PNG or SVG, by the suffix of `out`). Raises PlotUnavailable
    (the install hint) without matplotlib."""
    fig = figure(events, job=job, quota=quota, now=now)
    import matplotlib.pyplot as plt  # figure() found it
    out = Path(out)
    try:
        fig.savefig(out, format="svg" if out.suffix.lower() == ".svg" else "png")
    finally:
        plt.close(fig)
    return out


def figure(events: list[dict[str, Any]], *, job: str, quota: int | None = None,
           now: float | None = None) -> Any:
    """The matplotlib Figure: axes[0] steps over time, axes[1] goodput by part (stacked),
    axes[2] disk use (MiB etc.) on the steps' time axis."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(INSTALL_HINT) from None
    if not events:
        raise ValueError(f"job {job} has no history to draw")
    tl = timeline(events)
    end = now if now is not None else max(float(e["at"]) for e in events)
    fig, (ax, axg) = plt.subplots(2, 1, figsize=(10, 7.5), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.2]})
    _draw_steps(ax, tl)
    ax.set_ylabel("step")
    ax.grid(True, alpha=0.3)
    lost = tl.steps_lost
    ax.set_title(f"{job}: {_count(len(tl.attempts), 'attempt')}, {_count(len(tl.saves), 'requested save')}, "
                 f"{_count(lost, 'step')} lost" + ("" if tl.reported_steps else " (the job reports no steps)")
                 + (" (history starts mid-run)" if tl.partial else ""))
    _draw_goodput(axg, events, end)
    axg.set_xlabel("time (UTC)")
    axg.xaxis_date(tz=timezone.utc)
    axg.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax2 = ax.twinx()
    unit, scale = _bytes_unit(max([b for _, b in tl.disk] + [quota or 0]))
    if tl.disk:
        dxs = [_when(t) for t, _ in tl.disk] + [_when(end)]
        dys = [b / scale for _, b in tl.disk] + [tl.disk[-1][1] / scale]
        ax2.step(dxs, dys, where="post", color="tab:gray", linewidth=1, label="checkpoint disk use")
    if quota:
        ax2.axhline(quota / scale, color="tab:gray", linestyle=":", linewidth=1.5, label="quota")
    ax2.set_ylabel(f"checkpoint disk use ({unit})")
    ax2.set_ylim(bottom=0, top=max(ax2.get_ylim()[1], (quota or 0) / scale * 1.1))
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    h3, l3 = axg.get_legend_handles_labels()
    fig.autofmt_xdate()
    fig.legend(handles + h2 + h3, labels + l2 + l3, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    return fig


def _draw_steps(ax: Any, tl: Timeline) -> None:
    xs_all = [t for a in tl.attempts for t, _ in a.points] + [a.start for a in tl.attempts]
    span = (max(xs_all) - min(xs_all)) if xs_all else 0.0
    # Shaded spans at least 0.6% of the picture wide: a second lost in an hour's run shows.
    least = span * 0.006
    for k, (t0, t1) in enumerate(tl.down()):
        ax.axvspan(_when(t0), _when(max(t1, t0 + least)), color="tab:gray", alpha=0.25, linewidth=0,
                   label="down (exit to relaunch)" if k == 0 else None)
    resuming = [(a.start, a.first_step) for a in tl.attempts if a.first_step is not None]
    for k, (t0, t1) in enumerate(resuming):
        ax.axvspan(_when(t0), _when(max(t1, t0 + least)), color="tab:olive", alpha=0.15, linewidth=0,
                   label="starting up / resuming (launch to first step)" if k == 0 else None)
    for k, (t0, t1, lo, hi) in enumerate(tl.lost):
        ax.fill_between([_when(t0), _when(max(t1, t0 + least))], lo, hi, facecolor="tab:red", alpha=0.35,
                        edgecolor="tab:red", hatch="///", linewidth=0.8, label="steps lost" if k == 0 else None)
    shown: set[str] = set()
    for a in tl.attempts:
        if not a.points:
            continue
        name, colour = KINDS.get(a.reason, (a.reason, "tab:brown"))
        xs = [_when(t) for t, _ in a.points]
        ys = [s for _, s in a.points]
        ax.plot(xs, ys, "-o", color=colour, markersize=3, linewidth=1.5, label=None if name in shown else name)
        shown.add(name)
        if a.resume_step is not None:
            ax.plot([_when(a.start)], [a.resume_step], marker="^", color="tab:green", markersize=9,
                    linestyle="none", label=None if "resume" in shown else "resume")
            shown.add("resume")
        if a.crashed and a.end is not None:
            ax.plot([_when(a.end)], [ys[-1]], marker="X", color="tab:red", markersize=10,
                    linestyle="none", label=None if "crash" in shown else "crash")
            shown.add("crash")
    saved = [(t, s) for t, s in tl.saves if s is not None]
    if saved:
        ax.plot([_when(t) for t, _ in saved], [s for _, s in saved], marker="s", markersize=8,
                markerfacecolor="none", markeredgecolor="black", linestyle="none", label="requested save")
    for k, (t, source, outcome) in enumerate(tl.notices):
        ax.axvline(_when(t), color="tab:purple", linestyle="--", linewidth=1,
                   label="notice" if k == 0 else None)
        ax.annotate(f"{source}: {outcome}", (_when(t), 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color="tab:purple")


def _draw_goodput(ax: Any, events: list[dict[str, Any]], end: float) -> None:
    """Where the wall time since the first launch went, stacked by part, over time."""
    points = gp.series(events, end=end)
    if not points:
        ax.set_ylabel("seconds")
        ax.set_title("goodput: the job never launched in this history", fontsize=9)
        return
    xs = [_when(g.as_of) for g in points]
    parts = [p for p in gp.ALL if any(g.seconds.get(p, 0.0) > 0 for g in points)] or [gp.PRODUCTIVE]
    ax.stackplot(xs, *[[g.seconds.get(p, 0.0) for g in points] for p in parts],
                 colors=[PART_COLOURS[p] for p in parts], alpha=0.75,
                 labels=[f"goodput: {p.replace('_', ' ')}" for p in parts])
    last = points[-1]
    ratio = last.ratio
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title((f"goodput {ratio * 100:.0f}%: " if ratio is not None else "goodput: ")
                 + f"{last.seconds.get(gp.PRODUCTIVE, 0.0):.0f}s productive of {last.wall_s:.0f}s since the first "
                 "launch", fontsize=9)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _bytes_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0
