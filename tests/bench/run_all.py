"""trainsup's benchmark suite (`make bench`): runs every section, prints one table, and
writes RESULTS.md, results.json and restart_latency.png next to this file.

    .venv/bin/python tests/bench/run_all.py [--quick] [--only SECTION[,SECTION]] [--out DIR]

--quick is a smoke run (fewer repetitions, smaller states); its results are written to
a temp dir unless --out is given, so the committed results are always a full run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from measure import BENCH, Section  # noqa: E402

SECTIONS = {
    "restart": "bench_restart",
    "checkpoint": "bench_checkpoint",
    "training": "bench_training",
    "preempt": "bench_preempt",
    "notice": "bench_notice",
    "resume": "bench_resume",
    "scale": "bench_scale",
    "adopt": "bench_adopt",
    "deletion": "bench_deletion",
    "reprove": "bench_reprove",
    "integrations": "bench_integrations",
    "mirror": "bench_mirror",
    "longwork": "bench_long_work",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run")
    ap.add_argument("--out", default=None, help="where results go (default: tests/bench/, or a temp dir with --quick)")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(SECTIONS)
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section {', '.join(bad)} (known: {', '.join(SECTIONS)})")
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="trainsup-bench-quick-")) if a.quick else BENCH)
    out.mkdir(parents=True, exist_ok=True)
    info = report.machine()
    print(f"trainsup bench: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, "
          f"python {info['python']}, torch {info['torch']}", flush=True)
    sections: list[Section] = []
    failed = []
    t_all = time.monotonic()
    for name in names:
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        try:
            sec = importlib.import_module(SECTIONS[name]).run(quick=a.quick)
        except Exception as e:   # one broken section must not hide the others' results
            traceback.print_exc()
            sec = Section(name, notes=[f"section failed: {type(e).__name__}: {e}"])
            failed.append(name)
        sec.seconds = time.monotonic() - t0
        print(f"   ({sec.seconds:.0f} s)", flush=True)
        sections.append(sec)
    rows = [r for s in sections for r in s.rows]
    print(f"\n{report.table(rows)}\n")
    for s in sections:
        for n in s.notes:
            print(f"note: {s.name}: {n}")
    series = {k: v for s in sections for k, v in s.series.items()}
    png = "restart_latency.png" if report.plot(out / "restart_latency.png", series) else None
    cmd = ["tests/bench/run_all.py"] + (argv if argv is not None else sys.argv[1:])
    report.write_json(out / "results.json", info, sections, cmd)
    report.write_markdown(out / "RESULTS.md", info, sections, cmd, png)
    missed = [r.what for r in rows if r.met is False]
    print(f"wrote {out / 'RESULTS.md'}, results.json{', ' + png if png else ''} "
          f"in {time.monotonic() - t_all:.0f} s; targets missed: {len(missed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
