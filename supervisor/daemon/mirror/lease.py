"""The job's lease objects in the store (blocking; on a mirror thread).

One object per generation, `lease/<generation>.json`; the newest generation is the lease.
Taking it is creating the next generation *if absent* — the store decides atomically, so of
two machines that both saw generation 7 expire exactly one creates 8. Only its holder ever
writes a generation again (renewals, the release), so a renewal is a plain write. A holder
that finds a newer generation than its own has lost the lease (fencing): it must not train
or commit uploads. Expiry is judged by the waiter's own monotonic clock (policy.py): an
object seen unchanged for the lease's ttl; wall clocks of two machines are never compared.
"""

from __future__ import annotations

import json
import os
import time

from ...checkpoint.objectstore import Store, StoreError
from . import layout
from .policy import LeaseView

MAX_LEASE_BYTES = 64 << 10


def rel(generation: int) -> str:
    return f"{layout.LEASE}/{generation:012d}.json"


def read_newest(store: Store) -> LeaseView | None:
    """The newest generation's content; None when the store has no lease object. Raises
    StoreError when the store could not be read (never taken for "no lease")."""
    gens = sorted(int(e.name[:-5]) for e in store.listdir(layout.LEASE)
                  if e.name.endswith(".json") and e.name[:-5].isdigit())
    for gen in reversed(gens):
        # not a job path: the lease object in the store
        data = store.read_bytes(rel(gen), MAX_LEASE_BYTES)
        if data is None:
            continue            # removed between the listing and the read
        try:
            d = json.loads(data)
            return LeaseView(gen, str(d.get("holder")), int(d.get("renewals", 0)), bool(d.get("released")))
        except (ValueError, TypeError, AttributeError):
            # Unreadable content still holds its generation: waited out like any other.
            return LeaseView(gen, "(unreadable lease object)", -1, False)
    return None


def _body(holder: str, renewals: int, ttl: float, released: bool = False) -> bytes:
    return json.dumps({"holder": holder, "renewals": renewals, "ttl": ttl, "released": released,
                       "pid": os.getpid(), "at": time.time()}).encode()


def take(store: Store, generation: int, holder: str, ttl: float) -> bool:
    """Create generation `generation` if absent: True when this machine now holds it."""
    return store.create_if_absent(rel(generation), _body(holder, 0, ttl))


def renew(store: Store, generation: int, holder: str, renewals: int, ttl: float) -> None:
    # not a job path: the lease object in the store
    store.write_bytes(rel(generation), _body(holder, renewals, ttl))


def release(store: Store, generation: int, holder: str, renewals: int, ttl: float) -> None:
    # not a job path: the lease object in the store
    store.write_bytes(rel(generation), _body(holder, renewals, ttl, released=True))


def prune(store: Store, generation: int) -> None:
    """Older generations than the one before ours: history nobody reads."""
    try:
        for e in store.listdir(layout.LEASE):
            if e.name.endswith(".json") and e.name[:-5].isdigit() and int(e.name[:-5]) < generation - 1:
                store.remove(f"{layout.LEASE}/{e.name}")
    except StoreError:
        pass
