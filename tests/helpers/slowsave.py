"""A job whose save is one big file written slowly (network storage, multi-GB state): two
quick checkpoints, then one whose single file keeps growing, open, for --seconds."""

import argparse
import json
import os
import sys
import time

from trainsup.checkpoint import CheckpointWriter, write_checkpoint


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--record", required=True)
    a = p.parse_args()
    ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]

    def record(**kw):
        with open(a.record, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **kw}) + "\n")

    write_checkpoint(ck, 1, {"w.bin": b"1" * 1000})
    write_checkpoint(ck, 2, {"w.bin": b"2" * 1000})
    record(event="start")
    try:
        with CheckpointWriter(ck, 3) as w:
            record(event="slow-save", tmp=str(w.path))
            with open(w.path / "w.bin", "wb") as f:
                deadline = time.monotonic() + a.seconds
                while time.monotonic() < deadline:
                    f.write(b"3" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
                    time.sleep(0.05)
        record(event="committed", path=str(w.final_path))
    except OSError as e:
        record(event="save-failed", error=str(e))
        return 1
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
