"""A job that saves a trainsup checkpoint every --every seconds with the standard library
alone (sha256 manifest): it runs as another user with the system python, which has no
trainsup and no xxhash. Each save is written into .trainsup-tmp/, fsynced and renamed into
place; the landing time (wall clock, after the rename) goes to --log as one JSON line."""

import argparse
import hashlib
import json
import os
import signal
import sys
import time


def save(ck, step, size):
    tmp = os.path.join(ck, ".trainsup-tmp", f"step-{step:08d}.{os.getpid()}")
    os.makedirs(tmp)
    data = os.urandom(size)
    with open(os.path.join(tmp, "w.bin"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    m = {"format": "trainsup-checkpoint/1", "step": step, "reason": "periodic",
         "files": {"w.bin": {"size": size, "sha256": hashlib.sha256(data).hexdigest()}}}
    with open(os.path.join(tmp, "MANIFEST.json"), "w") as f:
        json.dump(m, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(ck, f"step-{step:08d}"))
    dfd = os.open(ck, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("--size", type=int, default=256 << 10)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    step = 0
    while True:
        step += 1
        save(ck, step, a.size)
        with open(a.log, "a") as f:
            f.write(json.dumps({"step": step, "landed": time.time()}) + "\n")
        time.sleep(a.every)


if __name__ == "__main__":
    main()
