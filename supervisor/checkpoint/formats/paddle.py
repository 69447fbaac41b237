"""PaddlePaddle checkpoints: prefix groups `<prefix>.pdparams` + `.pdopt` + `.states`/`.pdstates`.

PaddleOCR's save_model writes `.pdopt`, then `.pdparams`, then `.states` (the commit
marker), each with one write() of a pickle, in place: `latest` and `best_accuracy` are
overwritten every time, so a kill leaves the new `.pdopt` next to a 0-byte `.pdparams` and
the *previous* `.states`, which looks committed. Two checks catch it without unpickling:
every file must be one complete pickle (pickle_stream), and for Adam-family optimizers the
step the `.pdopt` was taken at must match the `.states` global_step: its power accumulators
hold beta^(step+1) in float32. beta1's (0.9) underflows below 1e-30 after ~650 steps, so
past that beta2's (0.999: informative up to ~69,000 steps, 0.9999: ~690,000) is read
instead. Past both, or for an optimizer without them (SGD, Momentum), a mix of complete
files from two saves is not detected: the README's format table says so. mtimes are not
used: copies and checkouts reorder them.

`.states` is read with an Unpickler that refuses every global (it is a dict of numbers).
Step: `.states` global_step (PaddleOCR), else `.pdstates` epoch (PaddleClas), else the
number in the name. Aliases: `latest`, `best_accuracy`, `best_model`, `best_model/model`.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import replace
from typing import Any

from ..naming import counter, show_int
from .common import Invalid, Verdict
from .group import FILE, Group, Listing, Looking, Opened, join, read_small
from .readers.pickle_stream import SmallArg, check_pickle_fd

SUFFIXES = (".pdparams", ".pdopt", ".states", ".pdstates")
MARKERS = (".states", ".pdstates")
ALIASES = {"latest": "latest", "best_accuracy": "best", "best_model": "best", "model": "best"}
_NUMBER = re.compile(r"(\d+)$")
# Adam's default beta1 and the other values people set; the check accepts a .pdopt whose
# power accumulator fits any of them at the .states step (so a non-default beta1 is never
# called broken), and rejects one that fits none.
_BETA1_SEEN = (0.9, 0.95, 0.99, 0.85, 0.8, 0.5)
_BETA2_SEEN = (0.999, 0.9999, 0.99, 0.98, 0.995, 0.95)


def _f32(x: float) -> float:
    # Paddle multiplies the accumulator by the float32 beta: the step read back from it is
    # exact only with that same beta (0.999 as a double drifts half a step by 50,000).
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _split(name: str) -> tuple[str, str] | None:
    for s in SUFFIXES:
        if name.endswith(s) and len(name) > len(s):
            return name[: -len(s)], s
    return None


NAME = "paddle"
KIND = "group"
COMMIT_MARKER = ".states"


def recognise(where: Looking) -> list[Group]:
    d, listing = where.dir, where.listing
    prefixes: dict[str, set[str]] = {}
    for name, kind in listing.items():
        if kind != FILE or name.startswith("."):
            continue
        sp = _split(name)
        if sp:
            prefixes.setdefault(sp[0], set()).add(sp[1])
    groups = []
    for prefix, have in sorted(prefixes.items()):
        if have <= set(MARKERS) and ".states" not in have:
            continue  # a lone .pdstates is metric info, not a checkpoint
        members = tuple(join(d, prefix + s) for s in (".states", ".pdstates", ".pdparams", ".pdopt")
                        if s in have)
        alias = ALIASES.get(prefix) if (prefix != "model" or d.endswith("best_model")) else None
        groups.append(Group(join(d, prefix), "paddle", members, resume=join(d, prefix), alias=alias))
    return groups


def _unpickling_error() -> type[Exception]:
    import pickle
    return pickle.UnpicklingError


def marker_required(d: str, listing: Listing) -> bool:
    """A dir whose saves write a marker (.states/.pdstates) needs one for every group there."""
    return any(k == FILE and n.endswith(MARKERS) for n, k in listing.items())


def _load_plain(data: bytes) -> object:
    """Unpickle refusing every global (pickle imported here: at the first Paddle check)."""
    import pickle

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
    return _NoGlobals(io.BytesIO(data)).load()


def check(root_fd: int, g: Group, listing: Listing) -> Verdict:
    need_marker = marker_required(g.dir, listing)
    prefix = g.name
    base = prefix.rsplit("/", 1)[-1]
    m = _NUMBER.search(base)
    # Until a .states says otherwise the name's number is an epoch (iter_epoch_N, epoch_N):
    # `harmonise` turns it into a step once the dir's committed groups show steps per epoch.
    step: int | None = None
    epoch: int | None = int(m.group(1)) if m else None
    metrics: dict = {}
    problems: list[str] = []
    have = {rel[len(prefix):] for rel in g.members}
    if ".pdparams" not in have:
        problems.append(f"missing {base}.pdparams")
    pdopt: _AdamPower | None = None
    for suffix in (".pdparams", ".pdopt"):
        if suffix not in have:
            continue
        rel = prefix + suffix
        acc = _AdamPower() if suffix == ".pdopt" else None
        try:
            with Opened(root_fd, rel) as (fd, st):
                check_pickle_fd(fd, st.st_size, acc.feed if acc else None)
            if acc is not None:
                pdopt = acc
        except Invalid as e:
            problems.append(f"{base}{suffix}: {e}")
    states_step = None
    if ".states" in have or ".pdstates" in have:
        suffix = ".states" if ".states" in have else ".pdstates"
        rel = prefix + suffix
        try:
            data = read_small(root_fd, rel, "paddle_states")
            with Opened(root_fd, rel) as (fd, st):
                check_pickle_fd(fd, st.st_size)
            try:
                st_obj = _load_plain(data)
            except (_unpickling_error(), EOFError, ValueError, TypeError, AttributeError,
                    IndexError, KeyError, MemoryError) as e:
                st_obj = None
                if suffix == ".states":
                    problems.append(f"{base}.states: not a plain dict of numbers ({e})")
            if isinstance(st_obj, dict):
                gs, ep = st_obj.get("global_step"), st_obj.get("epoch")
                # counters past 64 bits are a problem of this entry, never a number the
                # verdict's JSON, the DB or the metrics scrape meet (found: 10**5000)
                if isinstance(ep, int) and not isinstance(ep, bool):
                    epoch = counter(ep)
                if isinstance(gs, int) and not isinstance(gs, bool) and suffix == ".states":
                    if counter(gs) is None:
                        problems.append(f"{base}.states: global_step {show_int(gs)} is not a count in 0..2**63-1")
                    else:
                        states_step = step = gs
                for k in ("metric", "acc"):
                    v = st_obj.get(k)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics[k] = v
        except Invalid as e:
            problems.append(f"{base}{suffix}: {e}")
    elif need_marker and not (base == "model" and g.dir.endswith("best_model")):
        problems.append(f"missing {base}.states (commit marker: written last)")
    mismatch = pdopt.mismatch(states_step) if pdopt is not None and states_step is not None else None
    if mismatch is not None:
        problems.append(
            f"{base}.pdopt is from {mismatch} but {base}.states says global_step {states_step}: "
            f"files from different saves (interrupted in-place overwrite)")
    if problems:
        return Verdict("paddle", False, "; ".join(problems), step, epoch, metrics=metrics)
    return Verdict("paddle", True, None, step, epoch, metrics=metrics)


def cache_key(g: Group, listing: Listing) -> str:
    """A group's verdict depends on whether its dir's saves write markers at all."""
    return str(marker_required(g.dir, listing))


def finish(tree: Any, groups: list[Group], verdicts: dict[str, Verdict]) -> None:
    """Steps for marker-less groups from their neighbours', dir by dir."""
    for d in {g.dir for g in groups}:
        verdicts.update(harmonise({g.name: verdicts[g.name] for g in groups if g.dir == d}))


def harmonise(verdicts: dict[str, Verdict]) -> dict[str, Verdict]:
    """Steps for one dir's groups that only know their epoch (no .states: killed before the
    marker, PaddleClas, plain paddle.save): epoch x the steps-per-epoch that every group
    with a .states shows, else the epoch itself."""
    ratios = {v.step // v.epoch for v in verdicts.values()
              if v.step is not None and v.epoch and v.step % v.epoch == 0}
    exact = all(v.step % v.epoch == 0 for v in verdicts.values() if v.step is not None and v.epoch)
    k = ratios.pop() if len(ratios) == 1 and exact else None
    out = {}
    for name, v in verdicts.items():
        if v.step is None and v.epoch is not None:
            v = replace(v, step=v.epoch * k if k else v.epoch)
        out[name] = v
    return out


def _fits(power: float, step: int) -> bool:
    """beta1's accumulator fits some usual beta1 at `step` (the old check, kept for its
    tolerance on any beta1: implied beta within 1e-5)."""
    implied = math.exp(math.log(power) / (step + 1))
    return any(abs(implied - b) <= 1e-5 * b for b in _BETA1_SEEN)


def _fits_beta2(power: float, step: int) -> bool:
    """beta2's accumulator is beta2^(step+1) for some usual beta2, to the float32 rounding
    that accumulates over the steps (measured: under 3e-5 x step)."""
    for b in _BETA2_SEEN:
        implied = math.log(power) / math.log(_f32(b)) - 1
        if abs(implied - step) <= 0.5 + 1e-4 * step:
            return True
    return False


def _informative(v: float | None) -> bool:
    return v is not None and 1e-30 < v < 1.0


class _AdamPower:
    """Picks the first `*beta1_pow_acc*` and `*beta2_pow_acc*` tensors' 4-byte float32
    values out of the stream.

    Paddle pickles each as: key string, then numpy's reconstruct/BUILD with the raw data as
    a 4-byte bytes argument. The first 4-byte bytes argument after the key is that value.
    """

    def __init__(self) -> None:
        self.armed: str | None = None
        self.value: float | None = None     # beta1's
        self.value2: float | None = None    # beta2's

    def feed(self, op: str, arg: SmallArg) -> None:
        if self.value is not None and self.value2 is not None:
            return
        if isinstance(arg, str) and "beta1_pow_acc" in arg and self.value is None:
            self.armed = "1"
        elif isinstance(arg, str) and "beta2_pow_acc" in arg and self.value2 is None:
            self.armed = "2"
        elif self.armed and isinstance(arg, bytes) and len(arg) == 4:
            v = struct.unpack("<f", arg)[0]
            if self.armed == "1":
                self.value = v
            else:
                self.value2 = v
            self.armed = None

    def step_at(self, beta: float, value: float | None) -> int:
        v = value or 0.0
        if not 1e-30 < v < 1.0:
            return -1
        return round(math.log(v) / math.log(_f32(beta))) - 1

    def mismatch(self, step: int) -> str | None:
        """"step N (Adam betaK power P)" where the accumulators say this .pdopt was not taken
        at `step`; None where they fit (or say nothing: underflowed, or not Adam)."""
        v1, v2 = self.value, self.value2
        if v1 is not None and _informative(v1):
            return None if _fits(v1, step) else f"step {self.step_at(0.9, v1)} (Adam beta1 power {v1:.6g})"
        if v2 is not None and _informative(v2):
            return None if _fits_beta2(v2, step) else f"step {self.step_at(0.999, v2)} (Adam beta2 power {v2:.6g})"
        return None
