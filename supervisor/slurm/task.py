"""One Slurm task = one rank: `srun ... python -m trainsup.slurm.task -- CMD ARGS`.

Sets torch.distributed's env:// variables from Slurm's (RANK from SLURM_PROCID, ...)
unless the job set them, then execs CMD: the rank keeps this pid, so the signals srun
forwards (USR1 save, TERM) reach the training process itself. MASTER_PORT changes with
each attempt (TRAINSUP_ATTEMPT), so a step restarted in place never meets the previous
attempt's store still closing on the old port.
"""

from __future__ import annotations

import os
import sys

from .. import contract


def env_for_rank(env: dict[str, str]) -> dict[str, str]:
    out = dict(env)
    for name, slurm in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"),
                        ("LOCAL_RANK", "SLURM_LOCALID"), ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"),
                        ("NODE_RANK", "SLURM_NODEID")):
        if name not in out and slurm in env:
            out[name] = env[slurm]
    if "MASTER_PORT" not in out:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        attempt = int(env.get(contract.ATTEMPT, "1") or 1)
        out["MASTER_PORT"] = str(20000 + (job * 97 + attempt) % 20000)
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m trainsup.slurm.task -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        os.execvpe(argv[0], argv, env_for_rank(dict(os.environ)))
    except OSError as e:
        print(f"trainsup: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
