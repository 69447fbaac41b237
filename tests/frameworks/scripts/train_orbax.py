"""A typical JAX script with an Orbax CheckpointManager (CPU, one process): async saves every
--every steps (`max_to_keep` = --max-to-keep: Orbax prunes too), one on trainsup's request,
resumed with `mngr.restore(step)` of TRAINSUP_RESUME_FROM's step folder.
--kill-at-commit K: on the first attempt the process SIGKILLs itself inside the K-th save's
async finalize, with every file written to the tmp folder and before its rename.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
from trainsup import emergency


def loss_fn(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--max-to-keep", type=int, default=None)
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--last-periodic", type=int, default=0, help="no periodic save after this step (0: none)")
    p.add_argument("--kill-at-commit", type=int, default=0)
    args = p.parse_args()
    ckpt_dir = os.path.abspath(os.environ.get("TRAINSUP_CHECKPOINT_DIR") or "out")
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=args.max_to_keep))
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    state = {"params": params, "step": 0}
    resume = os.environ.get("TRAINSUP_RESUME_FROM")
    if resume:
        state = mngr.restore(int(os.path.basename(resume)), args=ocp.args.StandardRestore(state))
        print(f"resuming from {resume}", flush=True)
    saves = 0
    if os.environ.get("TRAINSUP_ATTEMPT", "1") == "1" and args.kill_at_commit:
        real = atomicity.AtomicRenameTemporaryPath.finalize
        commits = [0]

        async def finalize(self, *a, **kw):     # runs on Orbax's background thread (async save)
            if os.path.dirname(str(self.get_final())) == ckpt_dir:      # the step's, not an item's
                commits[0] += 1
            if commits[0] == args.kill_at_commit:
                print("killing myself before the commit", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return await real(self, *a, **kw)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    grad = jax.jit(jax.grad(loss_fn))
    true_w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    params, step = state["params"], int(state["step"])
    while step < args.steps:
        x = np.random.default_rng(step).standard_normal((16, 8)).astype(np.float32)
        g = grad(params, x, x @ true_w)
        params = jax.tree.map(lambda a, b: a - 0.05 * b, params, g)
        step += 1
        print(f"step {step}", flush=True)
        req = emergency.take(exits=True)      # the README's pattern: served(exit=True) below ends us
        if req or (step % args.every == 0 and not 0 < args.last_periodic < step):
            saves += 1
            print(f"saving step {step}", flush=True)
            mngr.save(step, args=ocp.args.StandardSave({"params": params, "step": step}), force=True)
            if req:
                mngr.wait_until_finished()
                emergency.served(req, os.path.join(ckpt_dir, str(step)), exit=True)
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
    mngr.wait_until_finished()
    h = hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in jax.tree.leaves(params)))
    print(f"finished step {step} weights {h.hexdigest()[:16]}", flush=True)
    mngr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
