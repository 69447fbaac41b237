"""The in-job training helper (SPEC section 9): resumable checkpoints for a torch loop.

The only module of trainsup that imports torch. A training loop uses it in a few lines:

    sampler = ResumableSampler(len(dataset), seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, sampler=sampler,
                        every_steps=50)
    step = ckpt.restore()
    ...  ckpt.step(step, metrics={"loss": loss.item()})  ... ckpt.save(step, reason="final")

Checkpoints are written through trainsup.checkpoint.CheckpointWriter (atomic, hashed
manifest): `state.pt` holds what every rank shares (model, optimizer, scheduler, scaler,
extras, step, epoch); `rank-NNNNN.pt` holds what each rank owns (RNG states, data
position). Without torch.distributed the rank part lives inside `state.pt`.

With `sharded=True` the model and optimizer go through torch.distributed.checkpoint
(DCP) instead, into the checkpoint's `dcp/` folder: every rank writes its own part, then
rank 0 commits once (the manifest hashes the DCP files like any other). `state.pt` then
names the keys that live in DCP; restore reads the format from the checkpoint, not from
the flag, so either kind of Checkpointer resumes either kind of checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Sampler

from . import contract, emergency
from .checkpoint import MANIFEST, TMP_DIR, CheckpointWriter, SaveError, read_manifest
from .checkpoint.format import STEP_DIR_RE, ManifestError, step_dirname

__all__ = ["Checkpointer", "ResumableSampler", "latest_checkpoint"]

STATE_FILE = "state.pt"
DCP_DIR = "dcp"   # a subfolder: DCP's file names (__0_0.distcp, .metadata) are its own
_monotonic = time.monotonic


def _log(msg: str) -> None:
    # One line on stderr: the daemon keeps the job's stderr in its log.
    print(f"trainsup: {msg}", file=sys.stderr, flush=True)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The committed checkpoint (step-* dir with MANIFEST.json) with the highest step."""
    best: tuple[int, Path] | None = None
    try:
        entries = list(os.scandir(os.fspath(ckpt_dir)))
    except FileNotFoundError:
        return None
    for e in entries:
        m = STEP_DIR_RE.match(e.name)
        if m and e.is_dir(follow_symlinks=False) and os.path.exists(os.path.join(e.path, MANIFEST)):
            s = int(m.group(1))
            if best is None or s > best[0]:
                best = (s, Path(e.path))
    return best[1] if best else None


def latest_valid_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest committed checkpoint whose manifest parses and whose files have the sizes
    it lists (a local run outside the daemon has nobody else to check; hashes are not
    re-read here, torch.load reads the bytes anyway)."""
    try:
        entries = list(os.scandir(os.fspath(ckpt_dir)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    cands = sorted(((int(m.group(1)), Path(e.path)) for e in entries
                    if (m := STEP_DIR_RE.match(e.name)) and e.is_dir(follow_symlinks=False)), reverse=True)
    for _, path in cands:
        try:
            man = read_manifest(path)
            if all((path / name).stat().st_size == f["size"] for name, f in man["files"].items()):
                return path
        except (ManifestError, OSError):
            continue
        _log(f"{path}: files differ from its manifest; skipping it")
    return None


# Key names of the state dicts that scripts wrote before they used the helper (the PyTorch
# tutorials' layout first). Checkpointer(legacy=fn) maps any other layout.
_LEGACY_KEYS = {
    "model": ("model_state_dict", "model", "state_dict", "net"),
    "optimizer": ("optimizer_state_dict", "optimizer", "opt", "optim"),
    "scheduler": ("scheduler_state_dict", "scheduler", "lr_scheduler", "sched"),
    "scaler": ("scaler_state_dict", "scaler", "grad_scaler"),
    "step": ("step", "global_step", "iteration", "iter"),
}


def map_legacy_state(obj: Any) -> dict | None:
    """A pre-trainsup torch checkpoint as {"model", "optimizer", "scheduler", "scaler",
    "step", "epoch"} (missing keys absent), or None when it is not a state dict we can map:
    a dict with the tutorials' keys, or a bare model state dict (names -> tensors)."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    out: dict[str, Any] = {}
    for key, names in _LEGACY_KEYS.items():
        for n in names:
            if n in obj:
                out[key] = obj[n]
                break
    if "epoch" in obj:
        out["epoch"] = obj["epoch"]
    if "model" not in out or not isinstance(out["model"], Mapping):
        return None
    return out


# ----------------------------------------------------------------------------------
# Data position
# ----------------------------------------------------------------------------------


class ResumableSampler(Sampler[int]):
    """A Sampler that reshuffles per epoch (torch.Generator seeded seed+epoch) and resumes
    mid-epoch at the exact next index.

    Each `iter()` starts the next epoch (no `set_epoch` call needed); `set_epoch(e)` pins
    the epoch of the next iteration, like DistributedSampler. Under torch.distributed
    (or with num_replicas/rank) each rank gets its stride of a padded permutation, as
    DistributedSampler does.

    `yielded` counts indices handed to the DataLoader, which prefetches: it runs ahead of
    what the loop consumed. The Checkpointer therefore records the position from the
    steps the loop completed, not from `yielded`.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        shuffle: bool = True,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if n <= 0:
            raise ValueError(f"ResumableSampler: n must be positive, got {n}")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if _dist_on() else 1
        if rank is None:
            rank = dist.get_rank() if _dist_on() else 0
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.num_samples = math.ceil(self.n / self.num_replicas)
        self.batch_size = batch_size         # learnt from the DataLoader when None
        self.epoch = 0
        self.yielded = 0                     # index position reached in this epoch's order
        self.iter_start = 0                  # position this epoch's iteration began at
        self.iterations = 0                  # number of iter() calls so far
        self._start = 0                      # position the next iteration begins at
        self._hold_epoch = False             # next iter() keeps self.epoch (set_epoch/resume)
        self._on_iter: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self.num_samples - (self._start if self._hold_epoch else 0)

    def set_epoch(self, epoch: int) -> None:
        # A loop that calls set_epoch(restored_epoch) after restore keeps the mid-epoch
        # position; any other epoch starts from its beginning.
        if not (self._hold_epoch and epoch == self.epoch):
            self._start = 0
        self.epoch = int(epoch)
        self._hold_epoch = True

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in yield order."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.num_samples * self.num_replicas
        if total > self.n:
            idx += (idx * math.ceil(total / self.n))[: total - self.n]
        return idx[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # DataLoader calls this on the first fetch of an epoch, i.e. after its iterator
        # drew its base seed from the global RNG: the Checkpointer's hook re-applies the
        # restored RNG state here so that draw does not shift a resumed run's dropout.
        if not self._hold_epoch and self.iterations:
            self.epoch += 1
            self._start = 0
        self._hold_epoch = False
        start, self._start = self._start, 0
        self.iter_start = self.yielded = start
        self.iterations += 1
        if self.batch_size is None:
            # The DataLoader's BatchSampler is our caller; its batch size converts the
            # loop's step count into a sample position.
            caller = sys._getframe(1).f_locals.get("self")
            if isinstance(caller, BatchSampler):
                self.batch_size = caller.batch_size
        hook = self._on_iter
        if hook is not None:
            hook()
        return self._generate(self.order(self.epoch), start)

    def _generate(self, order: list[int], start: int) -> Iterator[int]:
        for i in range(start, len(order)):
            self.yielded = i + 1
            yield order[i]

    def state_dict(self, position: int | None = None) -> dict:
        """`position`: samples of the current epoch consumed (default: `yielded`, exact
        only without prefetching)."""
        pos = self.yielded if position is None else position
        if self._hold_epoch:  # restored or set_epoch'd, not yet iterated
            pos = self._start
        return {"epoch": self.epoch, "position": int(pos), "seed": self.seed,
                "n": self.n, "num_replicas": self.num_replicas, "shuffle": self.shuffle,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["n"]) != self.n or int(state.get("num_replicas", 1)) != self.num_replicas:
            _log(f"sampler: dataset size/replicas changed ({state['n']}x{state.get('num_replicas', 1)}"
                 f" -> {self.n}x{self.num_replicas}); restarting epoch {state['epoch']} from its start")
            pos = 0
        else:
            pos = min(int(state["position"]), self.num_samples)
        self.epoch = int(state["epoch"])
        self._start = pos
        self.yielded = self.iter_start = pos
        self._hold_epoch = True
        if self.batch_size is None and state.get("batch_size"):
            self.batch_size = int(state["batch_size"])


# ----------------------------------------------------------------------------------
# RNG states (as plain lists/tensors so torch.load(weights_only=True) accepts them)
# ----------------------------------------------------------------------------------


def _rng_state() -> dict:
    v, internal, gauss = random.getstate()
    st: dict[str, Any] = {"python": [v, list(internal), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = [name, torch.from_numpy(np.asarray(keys).astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = st["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        except ImportError:
            _log("checkpoint has a NumPy RNG state but NumPy is not importable; not restored")
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) != torch.cuda.device_count():
            _log(f"checkpoint has {len(states)} CUDA RNG states, this host "
                 f"{torch.cuda.device_count()} devices; restoring the common ones")
        for i, s in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


class _Snapshot:
    """Copies state into CPU tensors training cannot mutate, for a background save.

    The buffers are kept and reused by the next save when the shapes match: touching
    fresh memory (page faults) was most of an async save's stall. Safe because a new save
    always waits for the previous one to finish reading them.
    """

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []
        self._i = 0

    def take(self, obj: Any) -> Any:
        self._i = 0
        return self._copy(obj)

    def _copy(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            i, self._i = self._i, self._i + 1
            if i < len(self._bufs):
                b = self._bufs[i]
                if b.shape == src.shape and b.dtype == src.dtype and b.is_contiguous():
                    b.copy_(src)
                    return b
            b = src.to("cpu", copy=True)
            if i < len(self._bufs):
                self._bufs[i] = b
            else:
                self._bufs.append(b)
            return b
        if isinstance(obj, dict):
            return type(obj)((k, self._copy(v)) for k, v in obj.items())
        if isinstance(obj, list):
            return [self._copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._copy(v) for v in obj)
        return obj


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every call without torch.distributed that it assumes one process,
    # which is exactly what sharded=True means there: not worth a line per save.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


# ----------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores a training loop's whole state in the trainsup format.

    Saves happen only inside `step()`/`save()` (step boundaries): every `every_steps`
    steps, every `every_seconds`, at the next step after the save signal, and after
    SIGTERM (then `should_stop` turns true). Under torch.distributed the ranks agree on
    the save step with a MAX all_reduce every `sync_every` steps (default: adaptive, so
    the collective costs about 1% of step time and runs at least once a second).

    `sharded=True` writes model and optimizer through DCP (each rank its part) instead of
    into `state.pt`; those DCP writes are synchronous even with `async_save` (they read
    the live tensors), the rest of the save stays asynchronous.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        sampler: ResumableSampler | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        *,
        dir: str | os.PathLike | None = None,
        extras: Any = None,
        resume_from: str | os.PathLike | None = None,
        resume_latest: bool | None = None,
        legacy: Callable[[Any], Mapping] | None = None,
        async_save: bool = False,
        batch_size: int | None = None,
        batches_per_step: int = 1,
        sync_every: int | None = None,
        hash: str = "xxh3_128",
        weights_only: bool = True,
        install_signals: bool = True,
        heartbeat_file: str | os.PathLike | None = None,
        sharded: bool = False,
    ) -> None:
        if sharded and model is None:
            raise ValueError("Checkpointer(sharded=True) needs model=: DCP shards the model state")
        d = dir if dir is not None else os.environ.get(contract.CHECKPOINT_DIR)
        if not d:
            raise ValueError("Checkpointer: no checkpoint dir (pass dir= or set TRAINSUP_CHECKPOINT_DIR)")
        self.dir = Path(d).absolute()
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.sampler = sampler
        self.extras = extras if extras is not None else {}
        self.every_steps = int(every_steps or 0)
        self.every_seconds = float(every_seconds) if every_seconds else None
        self.resume_from = resume_from
        # Outside the daemon nobody hands a checkpoint over: resume from the dir's newest.
        self.resume_latest = (not os.environ.get(contract.JOB)) if resume_latest is None else resume_latest
        self.legacy = legacy
        self.legacy_state: dict | None = None  # what a pre-trainsup checkpoint held (after mapping)
        self.notice: emergency.Request | None = None  # the daemon's notice of the last save signal
        self.async_save = async_save
        self.batch_size = batch_size
        self.batches_per_step = int(batches_per_step)
        self.hash = hash
        self.weights_only = weights_only
        self.sharded = bool(sharded)
        self.should_stop = False
        self.epoch: int | None = None
        self.last_saved: Path | None = None   # newest checkpoint this process committed
        self.resumed_from: Path | None = None
        self.save_seconds: list[float] = []   # durations of committed saves (for callers)

        self._step = 0
        self._metrics: Mapping | None = None
        # The handlers are emergency's (one owner of the process's save signal); this
        # object keeps its own marks against the counts they keep.
        self._flags = emergency.flags()
        self._sig_read = self._flags.save_count     # save_count when a notice was last read
        self._sig_served = self._flags.save_count   # signals covered by a committed save
        self._events_seen = self._flags.events      # the fast path: nothing new since
        self._preempt_notice = False                # a `preempt` notice came with a signal
        self._saving = False
        self._inflight: threading.Thread | None = None
        self._inflight_error: BaseException | None = None
        self._committed_steps: set[int] = set()
        self._iter_base_step = 0              # step at which the sampler's epoch began
        self._rank_state_pending: dict | None = None
        self._snapshot = _Snapshot()

        hb = heartbeat_file if heartbeat_file is not None else os.environ.get(contract.HEARTBEAT_FILE)
        self._heartbeat = Path(hb) if hb else None
        self._hb_fd = self._open_heartbeat()
        now = _monotonic()
        self._last_save_time = now
        self._next_tick = now if self.every_seconds else math.inf

        self._dist = _dist_on()
        self._rank = dist.get_rank() if self._dist else 0
        self._world = dist.get_world_size() if self._dist else 1
        self._sync_fixed = sync_every
        self._next_sync = 1 if self._dist else math.inf
        self._sync_mark: tuple[int, float] | None = None
        self._sync_cost = 0.0
        self._sync_costs: collections.deque = collections.deque(maxlen=8)

        if sampler is not None:
            sampler._on_iter = self._on_sampler_iter

        self.save_signal = emergency.save_signal_number()
        self._installed = False
        if install_signals:
            self._install_signals()

    # -- signals: emergency's handlers only count (saving inside a handler deadlocks) --

    _on_save_signal = staticmethod(emergency._on_save_signal)   # the handler this object relies on

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            _log("Checkpointer created off the main thread: no signal handlers, saves are periodic only")
            return
        # Put back on close() only what this object put in: handlers a script installed
        # first (trainsup.save_requested()) stay.
        self._installed = not self._flags.installed and emergency.install()

    @property
    def _sig_count(self) -> int:
        return self._flags.save_count

    @property
    def _preempt(self) -> bool:
        """A preemption this process was told of: a `preempt` notice or SIGTERM."""
        return self._preempt_notice or self._flags.term

    def close(self) -> None:
        """Wait for an async save and put the previous signal handlers back."""
        self.wait()
        if self._hb_fd >= 0:
            os.close(self._hb_fd)
            self._hb_fd = -1
        if self._installed:
            emergency.uninstall()
            self._installed = False

    # -- the hot path --

    def step(self, step: int, metrics: Mapping | None = None) -> Path | None:
        """Call once per optimizer step, after it. Saves when due or requested."""
        self._step = step
        self._metrics = metrics
        if self._hb_fd >= 0:
            self._beat(step)
        if (
            self._flags.events != self._events_seen
            or (self.every_steps and step % self.every_steps == 0)
            or step >= self._next_sync
            or _monotonic() >= self._next_tick
        ):
            return self._step_slow(step)
        return None

    def _step_slow(self, step: int) -> Path | None:
        now = _monotonic()
        periodic = bool(self.every_steps and step % self.every_steps == 0)
        if now >= self._next_tick:
            self._next_tick = self._last_save_time + self.every_seconds if self.every_seconds else math.inf
        timed = bool(self.every_seconds and now - self._last_save_time >= self.every_seconds)
        signalled = self._sig_count != self._sig_served
        if signalled:
            # The daemon writes what it wants before it signals: a `preempt` notice means
            # this save is the last one (save once, stop; no second save on SIGTERM).
            self._sig_read = self._sig_count
            self.notice = emergency.read_notice() or emergency.Request("checkpoint")
            if self.notice.kind == "preempt":
                self._preempt_notice = True
            if self._rank == 0:
                emergency._ack(self.notice, state="taken")
        preempt = self._preempt
        if self._dist:
            if step < self._next_sync:
                # Signals and timers differ across ranks: act on them only at agreed steps.
                # every_steps is the same on every rank, so it needs no agreement.
                signalled = preempt = timed = False
            else:
                signalled, preempt, timed = self._agree(step, now, signalled, preempt, timed)
        if not (periodic or timed or signalled or preempt):
            return None
        reason = "preempt" if preempt else "signal" if signalled else "periodic"
        path = self._save(step, reason, self._metrics, wait=preempt)
        if preempt:
            self.should_stop = True
        if signalled and self.notice is not None and self._rank == 0:
            emergency._ack(self.notice, path)
        return path

    @property
    def stop_is_remote(self) -> bool:
        """should_stop came from another rank's preemption: this process got neither a
        preempt notice nor SIGTERM. Under multi-node torchrun that is another node's
        ending, not this one's: exit non-zero so torchrun restarts this node's workers
        and they wait in the rendezvous for the preempted node to come back."""
        if not self.should_stop or self._preempt:
            return False
        if self._sig_count != self._sig_read:
            # This rank's own save signal arrived after the agreed stop (both ranks of one
            # node are signalled together): its notice says whether it was a preemption.
            notice = emergency.read_notice()
            return notice is None or notice.kind != "preempt"
        return True

    def _agree(self, step: int, now: float, signalled: bool, preempt: bool, timed: bool):
        t0 = _monotonic()
        flags = torch.tensor([int(signalled), int(preempt), int(timed), self._propose_sync_every(step, now)],
                             dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        # The smallest recent cost: time spent waiting for a slower rank is not the
        # collective's price, and counting it pushed the interval to its 1 s ceiling.
        self._sync_costs.append(_monotonic() - t0)
        self._sync_cost = min(self._sync_costs)
        self._sync_mark = (step, _monotonic())
        self._next_sync = step + max(1, int(flags[3]))
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _propose_sync_every(self, step: int, now: float) -> int:
        if self._sync_fixed:
            return int(self._sync_fixed)
        if self._sync_mark is None or step <= self._sync_mark[0]:
            return 1
        per_step = max((now - self._sync_mark[1]) / (step - self._sync_mark[0]), 1e-7)
        k = math.ceil(self._sync_cost / (0.01 * per_step))   # collective ~1% of step time
        return max(1, min(k, int(1.0 / per_step) or 1, 10_000))  # but at least once a second

    def _open_heartbeat(self) -> int:
        """The heartbeat file, held open: the step is rewritten in place at every step
        (contract.heartbeat_text), so the daemon reads the step reached even after a
        SIGKILL. -1 without one, or when it cannot be opened (said once)."""
        if self._heartbeat is None:
            return -1
        try:
            return os.open(self._heartbeat, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            _log(f"heartbeat file {self._heartbeat}: {e.strerror}; not touching it")
            return -1

    def _beat(self, step: int) -> None:
        try:
            os.pwrite(self._hb_fd, contract.heartbeat_text(step).encode(), 0)
        except OSError as e:
            _log(f"heartbeat file {self._heartbeat}: {e.strerror}; not touching it any more")
            os.close(self._hb_fd)
            self._hb_fd = -1

    def _on_sampler_iter(self) -> None:
        self._iter_base_step = self._step
        st = self._rank_state_pending
        if st is not None:
            # DataLoader drew its base seed from the global RNG just before this call; the
            # uninterrupted run drew that number before the checkpointed step, so re-apply.
            self._rank_state_pending = None
            _set_rng_state(st)

    # -- state --

    def _sampler_state(self, step: int) -> dict | None:
        s = self.sampler
        if s is None:
            return None
        if s._hold_epoch or not s.iterations:
            return s.state_dict()
        bs = self.batch_size or s.batch_size
        if bs is None:
            return s.state_dict()  # exact only with num_workers=0 (no prefetch)
        consumed = (step - self._iter_base_step) * self.batches_per_step * bs
        return s.state_dict(position=min(s.iter_start + consumed, s.num_samples))

    def _current_epoch(self) -> int | None:
        if self.sampler is not None:
            return self.sampler.epoch
        return self.epoch

    def _shared_state(self, step: int, in_dcp: list[str] | tuple[str, ...] = ()) -> dict:
        st: dict[str, Any] = {"step": step, "epoch": self._current_epoch()}
        if in_dcp:
            st["dcp"] = list(in_dcp)
        for key in ("model", "optimizer", "scheduler", "scaler"):
            obj = getattr(self, key)
            if obj is not None and key not in in_dcp:
                st[key] = obj.state_dict()
        ex = self.extras
        if hasattr(ex, "state_dict"):
            st["extras"] = ex.state_dict()
        else:
            st["extras"] = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in ex.items()}
        return st

    def _rank_state(self, step: int) -> dict:
        return {"rank": self._rank, "world_size": self._world, "rng": _rng_state(),
                "sampler": self._sampler_state(step)}

    # -- DCP (sharded=True) --

    def _dcp_keys(self) -> list[str]:
        """What a sharded save puts through DCP. The same on every rank (DDP keeps the
        optimizer's lazily created state in step), so the ranks' collectives match."""
        if not self.sharded:
            return []
        keys = ["model"]
        # A fresh optimizer has no state: DCP's get_optimizer_state_dict would take a
        # zero-lr step to create it, changing the step count the run goes on with.
        if self.optimizer is not None and self.optimizer.state:
            keys.append("optimizer")
        return keys

    def _dcp_state(self, keys: list[str]) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        assert self.model is not None   # sharded=True requires model= (checked in __init__)

        sd: dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if "optimizer" in keys:
            sd["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        return sd

    def _dcp_save(self, tmp: Path, keys: list[str]) -> None:
        import torch.distributed.checkpoint as dcp

        with _quiet_single_process():
            dcp.save(self._dcp_state(keys), storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR)),
                     no_dist=not self._dist)

    def _dcp_load(self, path: Path, keys: list[str]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        # A collective under torch.distributed: every rank restores the same checkpoint.
        if self.model is None:
            _log(f"{path}: has a DCP model state but no model= was given; not restored")
            return
        want = [k for k in keys if k == "model" or (k == "optimizer" and self.optimizer is not None)]
        if "optimizer" in keys and self.optimizer is None:
            _log(f"{path}: has a DCP optimizer state but no optimizer= was given; not restored")
        # Building the target dict sizes the fresh optimizer's state (a zero-lr step);
        # everything it creates is overwritten by the load below.
        sd = self._dcp_state(want)
        with _quiet_single_process():
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)), no_dist=not self._dist)
        set_model_state_dict(self.model, sd["model"])
        if "optimizer" in sd:
            set_optimizer_state_dict(self.model, self.optimizer, sd["optimizer"])

    # -- restore --

    def restore(self, resume_from: str | os.PathLike | None = None) -> int:
        """Load the checkpoint named by `resume_from`, else the constructor's, else
        TRAINSUP_RESUME_FROM; with none and resume_latest (default: when not run by the
        daemon), the newest valid one in the dir. Returns its step, or 0 when there is
        nothing to resume.

        A checkpoint from before the switch to the helper (a torch.save file such as
        last.pt) is loaded when it is a state dict Checkpointer can map (the tutorials'
        model_state_dict/optimizer_state_dict/..., or a bare model state dict), or through
        `legacy=fn` (fn(obj) -> {"model", "optimizer", "scheduler", "scaler", "step"});
        anything else raises RuntimeError with one line that says what to do."""
        src = resume_from or self.resume_from or os.environ.get(contract.RESUME_FROM) or None
        if not resume_from and not self.resume_from and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            # torchrun restarted its workers in place (--max-restarts): the daemon's
            # TRAINSUP_RESUME_FROM is from the agent's launch, older than what the ranks
            # saved since (a multi-node peer's preemption save): take the newest valid one.
            src = latest_valid_checkpoint(self.dir) or src
        if not src and self.resume_latest:
            src = latest_valid_checkpoint(self.dir)
        if not src:
            self._step = self._iter_base_step = 0
            return 0
        path = Path(src)
        if path.is_file():
            return self._restore_legacy(path)
        try:
            manifest = read_manifest(path)
        except Exception as e:
            raise RuntimeError(f"cannot resume from {path}: {e}") from None
        shared = torch.load(path / STATE_FILE, map_location="cpu", weights_only=self.weights_only)
        in_dcp = list(shared.get("dcp") or [])
        if in_dcp:
            try:
                self._dcp_load(path, in_dcp)
            except Exception as e:
                raise RuntimeError(f"cannot resume from {path}: reading {DCP_DIR}/ failed: {e}") from e
        for key in ("model", "optimizer", "scheduler", "scaler"):
            obj = getattr(self, key)
            if key in in_dcp:
                continue
            if obj is not None and key in shared:
                obj.load_state_dict(shared[key])
            elif obj is not None:
                _log(f"{path}: no {key} state in the checkpoint; keeping the fresh {key}")
        saved_ex = shared.get("extras") or {}
        if hasattr(self.extras, "load_state_dict"):
            self.extras.load_state_dict(saved_ex)
        else:
            for k, v in saved_ex.items():
                cur = self.extras.get(k)
                if cur is not None and hasattr(cur, "load_state_dict"):
                    cur.load_state_dict(v)
                else:
                    self.extras[k] = v
        rank_file = path / f"rank-{self._rank:05d}.pt"
        if rank_file.exists():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=self.weights_only)
        else:
            rank_state = shared.get("rank")
            if rank_state is None and self._rank != 0 and (path / "rank-00000.pt").exists():
                _log(f"{path}: no state for rank {self._rank}; using rank 0's RNG and data position")
                rank_state = torch.load(path / "rank-00000.pt", map_location="cpu", weights_only=self.weights_only)
        if rank_state is not None:
            _set_rng_state(rank_state["rng"])
            if self.sampler is not None and rank_state.get("sampler"):
                self.sampler.load_state_dict(rank_state["sampler"])
                self._rank_state_pending = rank_state["rng"]
        step = int(manifest["step"])
        self.epoch = shared.get("epoch", manifest.get("epoch"))
        self._step = self._iter_base_step = step
        self.resumed_from = path
        if path.parent.absolute() == self.dir:
            self._committed_steps.add(step)   # a save at this same step is a no-op
        self._last_save_time = _monotonic()
        return step

    def _restore_legacy(self, path: Path) -> int:
        hint = (f"cannot resume from {path}: not a trainsup checkpoint and not a state dict the helper "
                f"can map; pass Checkpointer(legacy=fn), or set checkpoint.format: trainsup in the job "
                f"(or move {path.name} out of {path.parent})")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=self.weights_only)
        except Exception as e:
            raise RuntimeError(f"{hint} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        mapped = self.legacy(obj) if self.legacy is not None else map_legacy_state(obj)
        if not mapped:
            raise RuntimeError(hint)
        mapped = dict(mapped)
        for key in ("model", "optimizer", "scheduler", "scaler"):
            obj_ = getattr(self, key)
            if obj_ is not None and mapped.get(key) is not None:
                obj_.load_state_dict(mapped[key])
            elif obj_ is not None:
                _log(f"{path}: no {key} state in this pre-trainsup checkpoint; keeping the fresh {key}")
        step = int(mapped.get("step") or 0)
        self.epoch = mapped.get("epoch")
        self.legacy_state = mapped
        self._step = self._iter_base_step = step
        self.resumed_from = path
        self._last_save_time = _monotonic()
        _log(f"resumed from {path} (a torch.save file from before the helper, step {step}); "
             f"the next save is a trainsup checkpoint in {self.dir}")
        return step

    # -- save --

    def save(self, step: int, reason: str = "manual", metrics: Mapping | None = None) -> Path | None:
        """Save now (all ranks must call it at the same step). Waits for the commit.
        Returns the committed path, or None when the save failed (logged)."""
        self._step = step
        if self._hb_fd >= 0:
            self._beat(step)
        path = self._save(step, reason, metrics if metrics is not None else self._metrics, wait=True)
        return path

    def wait(self) -> None:
        """Block until an in-flight async save is committed (or failed)."""
        t = self._inflight
        if t is not None:
            t.join()
            self._inflight = None

    def _save(self, step: int, reason: str, metrics: Mapping | None, wait: bool) -> Path | None:
        # One save at a time: an emergency or periodic save waits for an in-flight one.
        self.wait()
        if self._saving:
            return None
        self._saving = True
        sig_seen = self._sig_count
        t0 = _monotonic()
        try:
            done = step in self._committed_steps and (self.dir / step_dirname(step) / MANIFEST).exists()
            if self._dist:
                flag = torch.tensor([int(done)], dtype=torch.int64)
                dist.broadcast(flag, src=0)   # rank 0's view decides, or ranks would deadlock
                done = bool(flag)
            path: Path | None
            if done:
                path = self.dir / step_dirname(step)   # nothing changed since (e.g. final after preempt)
            elif self._dist:
                path = self._save_distributed(step, reason, metrics, wait)
            else:
                path = self._save_local(step, reason, metrics, wait)
        finally:
            self._saving = False
        # Signals that arrived while saving are covered by this save: one save, not two.
        self._sig_served = max(self._sig_served, sig_seen if path is None else self._sig_count)
        if not self._pending_flags():
            self._events_seen = self._flags.events
        self._last_save_time = _monotonic()
        if self.every_seconds:
            self._next_tick = min(self._next_tick, self._last_save_time + self.every_seconds)
        if path is not None and self._inflight is None:
            self.save_seconds.append(_monotonic() - t0)
        return path

    def _pending_flags(self) -> bool:
        return self._sig_count != self._sig_served or (self._preempt and not self.should_stop)

    def _writer(self, step: int, reason: str, metrics: Mapping | None) -> CheckpointWriter:
        clean = {}
        for k, v in (metrics or {}).items():
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                pass
        target = self.dir / step_dirname(step)
        if target.exists():
            # A committed checkpoint of an abandoned timeline (resumed from an older one):
            # move it aside so the writer's atomic rename can land; it is deleted after.
            (self.dir / TMP_DIR).mkdir(parents=True, exist_ok=True)
            aside = self.dir / TMP_DIR / f"{target.name}.replaced.{os.getpid()}"
            os.rename(target, aside)
        extra = {"writer": "trainsup.training", "world_size": self._world}
        return CheckpointWriter(self.dir, step, epoch=self._current_epoch(), reason=reason,
                                metrics=clean, hash=self.hash, extra=extra)

    def _committed(self, step: int, path: Path) -> Path:
        self._committed_steps.add(step)
        self.last_saved = path
        import shutil

        for p in (self.dir / TMP_DIR).glob(f"{step_dirname(step)}.replaced.*"):
            shutil.rmtree(p, ignore_errors=True)
        return path

    def _failed(self, step: int, e: BaseException) -> None:
        _log(f"checkpoint save at step {step} into {self.dir} failed: {e}; training goes on, "
             "retrying at the next due point")

    def _save_local(self, step: int, reason: str, metrics: Mapping | None, wait: bool) -> Path | None:
        in_dcp = self._dcp_keys()
        try:
            state = self._shared_state(step, in_dcp)
            state["rank"] = self._rank_state(step)
            w = self._writer(step, reason, metrics)
            w.__enter__()
        except (SaveError, OSError) as e:
            self._failed(step, e)
            return None
        if in_dcp:
            try:
                self._dcp_save(w.path, in_dcp)   # synchronous: it reads the live tensors
            except Exception as e:
                w.abort()
                self._failed(step, e)
                return None
        if self.async_save and not wait:
            snap = self._snapshot.take(state)
            w.held_s = _monotonic() - w.started     # the loop waits for the snapshot only
            self._start_background(step, w, snap)
            return w.final_path
        return self._write_and_commit(step, w, state)

    def _write_and_commit(self, step: int, w: CheckpointWriter, state: dict, rank_only: bool = False) -> Path | None:
        try:
            try:
                with w.hashed_file(STATE_FILE) as f:     # hashed as written: no read-back
                    torch.save(state, f)
            except BaseException as e:
                w.abort()
                raise SaveError(getattr(e, "errno", 0) or 0, f"writing {STATE_FILE}: {e}") from e
            path = w.commit()
        except SaveError as e:
            self._failed(step, e)
            return None
        return self._committed(step, path)

    def _start_background(self, step: int, w: CheckpointWriter, snap: dict) -> None:
        t0 = _monotonic()

        def run() -> None:
            if self._write_and_commit(step, w, snap) is not None:
                self.save_seconds.append(_monotonic() - t0)

        t = threading.Thread(target=run, name=f"trainsup-save-{step}", daemon=False)
        self._inflight = t
        t.start()

    def _save_distributed(self, step: int, reason: str, metrics: Mapping | None, wait: bool) -> Path | None:
        # Rank 0 opens the tmp dir and tells the others where it is; every rank writes its
        # own rank file; once all report success rank 0 writes the shared state and commits.
        w = None
        path_box: list[Any] = [None]
        if self._rank == 0:
            try:
                w = self._writer(step, reason, metrics)
                w.__enter__()
                path_box[0] = str(w.path)
            except (SaveError, OSError) as e:
                self._failed(step, e)
        dist.broadcast_object_list(path_box, src=0)
        if path_box[0] is None:
            return None
        ok = torch.ones(1, dtype=torch.int64)
        tmp = Path(path_box[0])
        try:
            _save_file(self._rank_state(step), tmp / f"rank-{self._rank:05d}.pt")
        except Exception as e:
            self._failed(step, e)
            ok.zero_()
        in_dcp = self._dcp_keys()
        if in_dcp:
            # DCP's save is itself a collective: enter it only when every rank will, and
            # it raises on every rank when any rank's write failed.
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if int(ok):
                try:
                    self._dcp_save(tmp, in_dcp)
                except Exception as e:
                    self._failed(step, e)
                    ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)   # the barrier before rank 0 commits
        if not int(ok):
            if w is not None:
                w.abort()
            return None
        final = Path(path_box[0]).parent.parent / step_dirname(step)
        if self._rank == 0:
            assert w is not None   # rank 0 opened the writer, or path_box would be None
            state = self._shared_state(step, in_dcp)
            if self.async_save and not wait:
                snap = self._snapshot.take(state)
                w.held_s = _monotonic() - w.started
                self._start_background(step, w, snap)
                return final
            done = self._write_and_commit(step, w, state)
            ok.fill_(1 if done is not None else 0)
        dist.broadcast(ok, src=0)
        if not int(ok):
            return None
        return self._committed(step, final)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
