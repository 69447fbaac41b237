"""The mirror's decisions, as pure functions of facts (table-tested, no I/O, no clock):

  uploads_wanted   which local checkpoints the store should get, in upload order
  remote_doomed    which complete remote checkpoints retention removes
  restore_choice   whether a launch restores from the store first, and what
  lease_decision   take, keep, wait for or take over the job's lease
  ExpiryClock      how long the lease object was seen unchanged, by successful reads only
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A valid local checkpoint the mirror could upload (oldest first in a list)."""
    key: str
    name: str
    step: int | None
    bytes: int = 0


def uploads_wanted(local: Sequence[Candidate], remote: Collection[str], keep: int,
                   first: str | None = None) -> list[Candidate]:
    """The local checkpoints to upload, in order: of everything the store has or could
    have, the newest `keep` are what retention would leave, so only those not there yet
    are worth the bandwidth (a slow link never spends an hour on a checkpoint retention
    deletes next). Oldest first, so the store's newest is always the newest uploaded;
    `first` (the emergency save of a preemption) goes ahead of everything."""
    keep = max(1, keep)
    union: dict[str, tuple[int, int | None, Candidate | None]] = {}
    for pos, c in enumerate(local):
        union[c.key] = (pos, c.step, c)
    # The store's keys sort by step (layout.entry_key); local order breaks ties.
    ranked = sorted(union.items(), key=lambda kv: (kv[1][1] if kv[1][1] is not None else -1, kv[1][0]))
    newest_local = {k for k, _ in ranked[-keep:]}
    in_store = set(remote)
    remote_newest = max((k for k in in_store), default=None)
    wanted = [c for c in local if c.key in newest_local and c.key not in in_store
              # never upload something older than what the store already has as newest
              and (remote_newest is None or c.key > remote_newest or c.step is None)]
    if first is not None:
        wanted.sort(key=lambda c: c.key != first)
    return wanted


def remote_doomed(keys: Sequence[str], keep: int, protect: Collection[str] = ()) -> list[str]:
    """Complete remote checkpoints to remove: all but the newest `keep` (at least 1), never
    the newest complete one, never one in `protect` (being restored), oldest first."""
    ordered = sorted(keys)
    kept = set(ordered[-max(1, keep):]) | set(protect)
    return [k for k in ordered if k not in kept]


@dataclass(frozen=True)
class LocalNewest:
    step: int | None
    mtime: float


def restore_choice(local: LocalNewest | None, remote: Sequence[tuple[str, int | None, float]],
                   mode: str = "auto") -> str | None:
    """The key to restore before a launch, or None: the newest complete remote checkpoint
    (key, step, created), when the local dir has nothing as new (a fresh machine, an empty
    disk). Steps decide where both have them; else the save times."""
    if mode == "never" or not remote:
        return None
    key, step, created = max(remote, key=lambda r: r[0])
    if local is None:
        return key
    if step is not None and local.step is not None:
        return key if step > local.step else None
    return key if created > local.mtime + 1.0 else None


@dataclass(frozen=True)
class LeaseView:
    """The newest lease object as last read: its generation and content."""
    generation: int
    holder: str
    renewals: int
    released: bool


@dataclass(frozen=True)
class LeaseDecision:
    action: str          # take | hold | wait | lost
    generation: int      # the generation to create (take) or that is held (hold)
    holder: str | None = None   # who holds it (wait, lost)


def lease_decision(me: str, view: LeaseView | None, unchanged_for: float, ttl: float,
                   mine: int | None = None) -> LeaseDecision:
    """What to do about the lease, from a *successful* read of the newest lease object
    (`view`, None: there is none) and how long this machine has seen that object
    unchanged by its own monotonic clock. A read that failed never reaches here: a store
    error is not an expiry. `mine`: the generation this machine holds, if any.

    - nothing there, or released by its holder: take the next generation;
    - ours (the generation we hold): keep it;
    - a newer generation than ours: we lost it (another machine took it over);
    - another holder's, seen unchanged for at least ttl: expired, take it over;
    - else wait, naming the holder."""
    if view is None:
        return LeaseDecision("take", 1)
    if mine is not None and view.generation == mine and view.holder == me:
        return LeaseDecision("hold", mine)
    if mine is not None and view.generation > mine:
        return LeaseDecision("lost", view.generation, view.holder)
    if view.released or view.holder == me:
        return LeaseDecision("take", view.generation + 1)
    if unchanged_for >= ttl:
        return LeaseDecision("take", view.generation + 1, view.holder)
    return LeaseDecision("wait", view.generation, view.holder)


class ExpiryClock:
    """How long a waiter has seen the lease object unchanged, by its own monotonic clock
    (the machines' wall clocks are never compared). A failed read restarts the watch: a
    store outage stops the holder's renewals as surely as it stops our reads, so an object
    unchanged across an outage says nothing about the holder. Expiry is a full ttl of
    successful reads that all saw the same object."""

    def __init__(self) -> None:
        self._seen: tuple | None = None
        self._since = 0.0
        self._watching = False

    def observe(self, ident: tuple | None, now: float) -> float:
        """A successful read saw `ident` (None: no lease object): seconds unchanged."""
        if not self._watching or ident != self._seen:
            self._seen, self._since, self._watching = ident, now, True
        return now - self._since

    def store_failed(self) -> None:
        self._watching = False
