"""What the fault tests share: finding a job's live processes, canaries, mounts."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil


def job_processes(name: str, root: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes launched for job `name` by a daemon rooted at `root`.
    The checkpoint dir in the environment tells our job from a same-named one of another
    test run on this shared machine."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if f"TRAINSUP_JOB={name}".encode() not in env:
                continue
            if not any(e.startswith(b"TRAINSUP_CHECKPOINT_DIR=" + str(root).encode()) for e in env):
                continue
            # the job's shim (its small parent, holding its exit status) is not a copy of the job
            if p.status() != psutil.STATUS_ZOMBIE and p.name() != "trainsup-shim":
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def kill_job_processes(name: str, root: Path) -> None:
    for p in job_processes(name, root):
        try:
            p.kill()
        except psutil.Error:
            pass


def plant_canaries(ck: Path, outside: Path) -> dict:
    """Files in and next to a checkpoint dir that rotation must never touch: a note, a
    data folder, links pointing outside."""
    ck.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "precious.bin").write_bytes(b"precious" * 512)
    (outside / "dir").mkdir(exist_ok=True)
    (outside / "dir" / "inner").write_bytes(b"inner")
    (ck / "NOTES.txt").write_text("the user's notes\n")
    (ck / "data").mkdir(exist_ok=True)
    (ck / "data" / "shard0").write_bytes(b"s" * 100)
    # Links that are not checkpoint-shaped: rotation's first deletion is then a real one.
    os.symlink(outside / "precious.bin", ck / "precious-link")
    os.symlink(outside / "dir", ck / "dir-link")
    return snapshot(outside) | {f"ck/{k}": v for k, v in snapshot(ck, only=("NOTES.txt", "data")).items()}


def canaries_now(ck: Path, outside: Path) -> dict:
    return snapshot(outside) | {f"ck/{k}": v for k, v in snapshot(ck, only=("NOTES.txt", "data")).items()}


def snapshot(root: Path, only: tuple = ()) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if only and rel.parts[0] not in only:
            continue
        if p.is_file() and not p.is_symlink():
            out[str(rel)] = p.read_bytes()
    return out


def db_integrity(state_dir: Path) -> str:
    c = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return c.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        c.close()


@contextmanager
def tmpfs(size: str):
    """A real small tmpfs (we are root); always unmounted."""
    import pytest
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tempfile.mkdtemp(prefix="trainsup-tmpfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield Path(mnt)
    finally:
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        os.rmdir(mnt)


def fill(path: Path) -> int:
    """Write into `path` until the filesystem says ENOSPC; returns bytes written."""
    n = 0
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                n += f.write(chunk)
        except OSError:
            pass
    small = b"\0" * 512
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                n += f.write(small)
        except OSError:
            pass
    return n
