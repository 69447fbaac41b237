"""A job for the resume bench: a model of a given size under trainsup.training.

    resume_job.py RECORD MIB EVERY
Records (JSON lines) the wall time its process began and the wall time its first training
step after restore() finished, with the step it resumed from.
"""
import time

T_EXEC = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from trainsup.training import Checkpointer  # noqa: E402


def main() -> None:
    rec, mib, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    per = (mib << 20) // 4 // 8
    # torch.empty: building the model costs nothing, so the measure is restore, not init.
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(per)) for _ in range(8)])
    ck = Checkpointer(model=model, every_steps=every)
    step = ck.restore()
    resumed = step
    while not ck.should_stop:
        step += 1
        model[0].data[0] += 1.0          # a (tiny) training step
        if step == resumed + 1:
            with open(rec, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "exec": T_EXEC, "first_step": time.time(),
                                    "resumed": resumed}) + "\n")
        ck.step(step)
        time.sleep(0.01)
    ck.close()


if __name__ == "__main__":
    main()
