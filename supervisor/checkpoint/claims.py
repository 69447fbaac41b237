"""Which directories a job may claim as its checkpoint dir (checked when the config loads).

Rotation deletes inside the checkpoint dir, so the dir itself must be one that holds only
this job's checkpoints. Refused, each with one `FILE:LINE: checkpoint.dir: ...` line:
  - `/`, any account's home dir ($HOME included), or a dir containing the state dir or the
    jobs dir, or inside the state dir (`$HOME` was once accepted and the user's
    downloaded weights were rotated away);
  - a path with a symlink in any existing component: refused, not pinned (dirhandle.py
    says why) — the message names the link and its target so the real path can be used;
  - the same dir as another job's, or a parent of another job's (case 4: job A's rotation
    deleted job B's newest checkpoint). The later file (by name) is the refused one; the
    message points at the first.
Pure functions of paths plus lstat/pwd lookups; config/ calls them.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .dirhandle import find_symlink


def home_dirs(env: Mapping[str, str] = os.environ) -> set[Path]:
    homes = set()
    try:
        for pw in pwd.getpwall():
            if pw.pw_dir and pw.pw_dir != "/" and os.path.isabs(pw.pw_dir):
                homes.add(Path(os.path.normpath(pw.pw_dir)))
    except OSError:
        pass
    h = env.get("HOME")
    if h and os.path.isabs(h) and os.path.normpath(h) != "/":
        homes.add(Path(os.path.normpath(h)))
    return homes


def _within(child: Path, parent: Path) -> bool:
    # on the strings of normalised absolute paths: Path.parents costs a list of Paths
    c, p = str(child), str(parent)
    return c == p or c.startswith(p if p.endswith("/") else p + "/")


def refuse_dir(d: Path, *, state_dir: Path | None = None, jobs_dir: Path | None = None,
               env: Mapping[str, str] = os.environ, homes: set[Path] | None = None) -> str | None:
    """Why `d` (absolute, normalised) cannot be a checkpoint dir, or None. homes: the
    home dirs, when the caller looked them up once for many dirs."""
    d = Path(os.path.normpath(d))
    if d == Path("/"):
        return "`/` cannot be a checkpoint dir; use a dir of its own, e.g. <workdir>/checkpoints"
    if d in (home_dirs(env) if homes is None else homes):
        return f"{d} is a home dir; use a dir of its own inside it, e.g. {d}/checkpoints/<job>"
    for what, special in (("state dir", state_dir), ("jobs dir", jobs_dir)):
        if special is None:
            continue
        special = Path(os.path.normpath(special))
        if _within(special, d):
            return f"{d} is or contains the daemon's {what} ({special}); use a dir of its own"
        if what == "state dir" and _within(d, special):
            return f"{d} is inside the daemon's state dir ({special}); use a dir of its own"
    link = find_symlink(d)
    if link is not None:
        return (f"{link[0]} is a symlink to {link[1]!r}; checkpoint dirs are never reached through "
                f"symlinks: configure the real path")
    return None


def dir_line(source: Path) -> int:
    """The line of `checkpoint.dir` (else `checkpoint:`) in a job file; 1 if not found."""
    try:
        # not a job path: the job file (YAML) the daemon was configured with
        root = yaml.compose(Path(source).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return 1
    if not isinstance(root, yaml.MappingNode):
        return 1
    for k, v in root.value:
        if getattr(k, "value", None) == "checkpoint":
            if isinstance(v, yaml.MappingNode):
                for k2, v2 in v.value:
                    if getattr(k2, "value", None) == "dir":
                        return v2.start_mark.line + 1
            return k.start_mark.line + 1
    return 1


def cross_job_conflicts(jobs: Sequence, *, state_dir: Path | None = None,
                        jobs_dir: Path | None = None,
                        env: Mapping[str, str] = os.environ) -> dict[str, list[str]]:
    """job name -> `FILE:LINE: checkpoint.dir: ...` lines, for JobSpecs (in load order).

    Linear in the jobs (times the depth of their dirs): a daemon with 200 jobs spent a
    second of its start comparing every dir with every other."""
    out: dict[str, list[str]] = {}
    homes = home_dirs(env)
    # claimed dir -> (order, dir, job); every ancestor of a claimed dir -> its first claimant
    claimed: dict[str, tuple[int, Path, Any]] = {}
    under: dict[str, tuple[int, Path, Any]] = {}
    for job in jobs:
        ck = getattr(job, "checkpoint", None)
        if ck is None:
            continue
        d = Path(os.path.normpath(ck.dir))
        why = refuse_dir(d, state_dir=state_dir, jobs_dir=jobs_dir, env=env, homes=homes)
        if why is None:
            # the first claimant (in load order) this dir conflicts with, as a pairwise scan finds it
            hits = []
            if str(d) in claimed:
                hits.append(("same", claimed[str(d)]))
            if str(d) in under:
                hits.append(("contains", under[str(d)]))
            hits += [("inside", claimed[str(a)]) for a in d.parents if str(a) in claimed]
            if hits:
                kind, (_, other_dir, other) = min(hits, key=lambda h: h[1][0])
                at = f"({other.source}:{dir_line(other.source)}); each job needs its own"
                why = {"same": f"{d} is also job {other.name!r}'s checkpoint dir {at}",
                       "contains": f"{d} contains job {other.name!r}'s checkpoint dir {other_dir} {at}",
                       "inside": f"{d} is inside job {other.name!r}'s checkpoint dir {other_dir} {at}"}[kind]
        if why:
            # the line is looked up only for a refusal (a second parse of the file)
            out.setdefault(job.name, []).append(f"{job.source}:{dir_line(job.source)}: checkpoint.dir: {why}")
        else:
            entry = (len(claimed), d, job)
            claimed[str(d)] = entry
            for a in d.parents:
                under.setdefault(str(a), entry)
    return out
