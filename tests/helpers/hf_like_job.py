"""Saves checkpoints shaped and ordered like Hugging Face Trainer's (transformers 5.x):
`checkpoint-<step>/` is created, its files are written in place, and `trainer_state.json`
comes last, inside the dir. No torch, no transformers: the bytes are small but valid.

Steps advance every 5 ms from --start-step. SIGUSR1 asks for a save at the current step;
--inner-delay seconds pass between the weights and trainer_state.json. With --stale N,
a complete checkpoint-N with hour-old mtimes appears first (an `rsync -a` of an old
checkpoint, or a completion the daemon sees late): it must never confirm the request.
Records JSON lines: start, saved (step and the wall time trainer_state.json was written).
"""

import argparse
import json
import os
import signal
import struct
import sys
import time
from pathlib import Path


def record(path, **kw):
    with open(path, "a") as f:
        f.write(json.dumps(dict(kw, pid=os.getpid())) + "\n")


def safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def save(root: Path, step: int, inner_delay: float, rec: str) -> None:
    d = root / f"checkpoint-{step}"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(safetensors())
    time.sleep(inner_delay)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0, "log_history": []}))
    record(rec, event="saved", step=step, state_at=time.time())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--record", required=True)
    p.add_argument("--start-step", type=int, default=1)
    p.add_argument("--inner-delay", type=float, default=0.3)
    p.add_argument("--stale", type=int, default=None)
    p.add_argument("--progress", default=None, help="overwrite this file with the step every 10 steps")
    a = p.parse_args()
    root = Path(os.environ["TRAINSUP_CHECKPOINT_DIR"])
    want = []
    signal.signal(signal.SIGUSR1, lambda *_: want.append(1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    step = a.start_step
    save(root, step, 0.0, a.record)
    record(a.record, event="start")
    while True:
        time.sleep(0.005)
        step += 1
        if a.progress and step % 10 == 0:
            Path(a.progress).write_text(str(step))
        if want:
            want.clear()
            if a.stale is not None and not (root / f"checkpoint-{a.stale}").exists():
                stage = root / ".stale"            # built aside, moved in whole: never seen half-written
                stage.mkdir()
                save(stage, a.stale, 0.0, a.record)
                old = time.time() - 3600
                for f in [*(stage / f"checkpoint-{a.stale}").iterdir(), stage / f"checkpoint-{a.stale}"]:
                    os.utime(f, (old, old))
                os.rename(stage / f"checkpoint-{a.stale}", root / f"checkpoint-{a.stale}")
                stage.rmdir()
            save(root, step, a.inner_delay, a.record)


if __name__ == "__main__":
    sys.exit(main())
