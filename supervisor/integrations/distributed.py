"""Emergency saves for collective checkpoints (torch.distributed.checkpoint, DeepSpeed's
save_checkpoint, Accelerate's save_state): every rank must call the save at the same step,
or the collective hangs. The save signal reaches each rank at its own moment, so no rank
may act on its own flag.

    from trainsup.integrations.distributed import agreed_request, saved
    req = agreed_request()                 # every rank, every step: the same answer on all
    if req or step % every == 0:
        dcp.save(state, checkpoint_id=f"{ckpt_dir}/step_{step}")
        saved(req, f"{ckpt_dir}/step_{step}")   # after a preempt/SIGTERM: every rank exits

Rank 0 alone takes the save signal and the daemon's notice (one request, one ack); every
rank catches SIGTERM (the daemon sends it to the whole process group: an uncaught one
would kill a rank in the middle of the collective save). One all_reduce (MAX) of a small
code per call makes the answer the same everywhere; it runs on the default process group.
"""

from __future__ import annotations

from typing import Any

from .. import emergency

_KINDS = ("", "checkpoint", "preempt", "terminate")      # ordered: the stronger wins


def _dist() -> Any:
    import torch
    import torch.distributed as dist
    return torch, dist


def agreed_request() -> emergency.Request | None:
    """The request every rank acts on now (None: go on), the same on every rank."""
    torch, dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if ready else 0
    if rank != 0:
        emergency.install(save_signal=False)      # SIGTERM only: the save signal is rank 0's
    # saved() ends every rank after a stopping request's save: the ack promises that exit
    # (without it the daemon sent SIGTERM once it saw the save, torchrun took it and exited 1)
    req = emergency.take(exits=True)
    code = _KINDS.index(req.kind) if req is not None and req.kind in _KINDS else 0
    if not ready:
        return req
    t = torch.tensor([code], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed = int(t.item())
    if agreed == 0:
        return None
    if req is not None and req.kind == _KINDS[agreed]:
        return req
    return emergency.Request(_KINDS[agreed])


def saved(req: emergency.Request | None, path: Any = None) -> None:
    """The save for `req` is complete on every rank: acknowledge it (rank 0) and, after a
    preemption or SIGTERM, end every rank with the job's exit code (0 after a preempt)."""
    if req is None:
        return
    _, dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if ready:
        dist.barrier()              # every rank's part of the save is written
    if not ready or dist.get_rank() == 0:
        emergency.served(req, path)
    if req.stops:
        if ready:
            dist.barrier()          # the ack is written before any rank leaves
            dist.destroy_process_group()
        raise SystemExit(req.exit_code)
