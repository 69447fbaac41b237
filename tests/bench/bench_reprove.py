"""The pre-launch re-proof alone (issue 20): what handing a resume point costs on a 1 GiB
checkpoint — on ext4 the lstat fingerprint (a mapped write moves ctime there), on tmpfs a
re-hash (mapped writes never move it) — side by side with a plain read of the same file.
The measurement itself is bench_deletion.reproof; this section runs it without the
deletion section's 10 GiB landing.

    .venv/bin/python tests/bench/run_all.py --only reprove [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_deletion import reproof  # noqa: E402
from measure import Section  # noqa: E402


def run(quick: bool = False) -> Section:
    sec = Section("reprove")
    t = time.monotonic()
    reproof(sec, (256 << 20) if quick else (1 << 30))
    sec.seconds = time.monotonic() - t
    return sec


if __name__ == "__main__":
    import report
    s = run(quick="--quick" in sys.argv)
    print()
    print(report.table(s.rows))
