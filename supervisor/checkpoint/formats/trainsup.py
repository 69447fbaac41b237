"""trainsup's own format: a `step-<8+ digits>/` directory whose MANIFEST.json (written last,
then the directory renamed into place: checkpoint/format.py) lists every file with its size
and hash. A directory without the manifest is not committed; a file whose size or hash
differs was cut short or changed after the commit."""

from __future__ import annotations

import os

from ..format import MANIFEST, ManifestError, hash_fd, parse_manifest
from ..naming import TRAINSUP_DIR, step_of
from .common import Invalid, Verdict, entry_dir, open_file, read_capped

NAME = "trainsup"
KIND = "entry"                       # one directory entry of the checkpoint dir
COMMIT_MARKER = MANIFEST
DIR_RE = TRAINSUP_DIR


def claims(name: str, is_dir: bool) -> bool:
    return is_dir and DIR_RE.fullmatch(name) is not None


def check_trainsup(path: str) -> Verdict:
    name = os.path.basename(path)
    step = step_of(name)
    dfd = entry_dir(path, "trainsup", step)
    if isinstance(dfd, Verdict):
        return dfd
    try:
        try:
            m = parse_manifest(read_capped(dfd, MANIFEST, "manifest"))
        except Invalid as e:
            msg = "no MANIFEST.json (not committed)" if str(e) == f"missing {MANIFEST}" else str(e)
            return Verdict("trainsup", False, msg, step)
        except ManifestError as e:
            return Verdict("trainsup", False, str(e), step)
        metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
        base = dict(
            step=m["step"],
            epoch=m.get("epoch") if isinstance(m.get("epoch"), int) else None,
            reason=m.get("reason") if isinstance(m.get("reason"), str) else None,
            created=m.get("created") if isinstance(m.get("created"), str) else None,
            metrics=metrics,
            save_s=float(m["save_s"]) if isinstance(m.get("save_s"), (int, float)) and not isinstance(
                m.get("save_s"), bool) and 0 <= m["save_s"] < 1e7 else None,
        )
        try:
            _check_trainsup_files(dfd, m["files"])
        except Invalid as e:
            return Verdict("trainsup", False, str(e), **base)
        return Verdict("trainsup", True, None, **base)
    finally:
        os.close(dfd)


def _check_trainsup_files(dfd: int, files: dict) -> None:
    # Sizes first: a truncated file is caught without hashing gigabytes. One file open at
    # a time (a manifest may list 50,000): each is opened again to be hashed, and must
    # still be the file whose size was checked.
    seen: list[tuple[str, tuple[int, int], dict]] = []
    for rel in sorted(files):
        entry = files[rel]
        if "\0" in rel or rel.startswith("/") or ".." in rel.split("/"):
            # A hostile manifest: never a path outside the entry, never an exception.
            what = "a NUL byte in the name" if "\0" in rel else "not a file name inside the checkpoint"
            raise Invalid(f"{rel!r}: {what}")
        fd, st = open_file(dfd, rel)
        os.close(fd)
        if st.st_size != entry["size"]:
            raise Invalid(f"{rel}: size {st.st_size} != manifest {entry['size']} (truncated or rewritten)")
        seen.append((rel, (st.st_ino, st.st_size), entry))
    for rel, ident, entry in seen:
        fd, st = open_file(dfd, rel)
        try:
            if (st.st_ino, st.st_size) != ident:
                raise Invalid(f"{rel}: replaced while checking")
            algo = "xxh3_128" if isinstance(entry.get("xxh3_128"), str) else "sha256"
            if hash_fd(fd, algo) != entry[algo].lower():
                raise Invalid(f"{rel}: {algo} mismatch (content corrupt or changed after commit)")
        finally:
            os.close(fd)


check = check_trainsup
