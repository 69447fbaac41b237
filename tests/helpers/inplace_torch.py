"""A torch job that rewrites latest.pth in place (torch.save truncates, then writes) --times
times, with a numbered step_N.pt every 20 saves so rotation has work while it does so."""

import json
import os
import sys

import torch


def main() -> int:
    ck = os.environ["TRAINSUP_CHECKPOINT_DIR"]
    times, record = int(sys.argv[1]), sys.argv[2]
    model = torch.nn.Linear(256, 256)
    for i in range(1, times + 1):
        with torch.no_grad():
            model.weight.add_(1.0)
        torch.save({"step": i, "model": model.state_dict()}, os.path.join(ck, "latest.pth"))
        if i % 20 == 0:
            torch.save({"step": i, "model": model.state_dict()}, os.path.join(ck, f"step_{i}.pt"))
    with open(record, "a") as f:
        f.write(json.dumps({"event": "done", "saves": times}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
