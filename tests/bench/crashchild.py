"""The job every restart bench launches: record the start time, crash at once.

    crashchild.py RECORD N   -> appends "S <time>" then "E <time>"; exits 1 for the
                                first N starts recorded in RECORD, 0 after.
Restart latency = S of attempt k+1 minus E of attempt k, the same for every supervisor.
"""
import os
import sys
import time


def main() -> None:
    t = time.time()
    rec, n = sys.argv[1], int(sys.argv[2])
    with open(rec, "a") as f:
        f.write(f"S {t!r}\n")
    with open(rec) as f:
        starts = sum(1 for line in f if line.startswith("S"))
    code = 1 if starts <= n else 0
    with open(rec, "a") as f:
        f.write(f"E {time.time()!r}\n")
    # os._exit: no interpreter teardown, so E is the moment the process ends.
    os._exit(code)


if __name__ == "__main__":
    main()
