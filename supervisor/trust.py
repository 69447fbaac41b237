"""Who could have written a file or a directory: the one check behind every path whose
content the daemon acts on with its own privileges — the control socket's directory, the
jobs dir and its job files, the preemption trigger file and its directory.

A directory someone else can write lets them replace what is in it (the socket: they
impersonate the daemon; a job file: their command runs as root; a trigger file: they
preempt every job). A file someone else can write lets them change what it says.
Imports nothing of trainsup: the CLI's client end and the config loader both use it.
"""

from __future__ import annotations

import os
import pwd
import stat


def daemon_owners() -> set[int]:
    """The uids trusted as owners: root and the daemon's own user."""
    return {0, os.geteuid()}


def daemon_groups() -> set[int]:
    """Groups whose write permission is no one else's: root's and the daemon's group."""
    return {0, os.getegid()}


def _writers(st: os.stat_result, gids: set[int]) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"it is writable by others (mode {mode:04o})"
    if mode & stat.S_IWGRP and st.st_gid not in gids:
        return f"it is writable by group {st.st_gid} (mode {mode:04o})"
    return None


def unsafe_dir(st: os.stat_result, owners: set[int], gids: set[int]) -> str | None:
    """Why a directory lets someone other than `owners` replace what is in it, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid not in owners:
        return f"it is owned by uid {st.st_uid}"
    return _writers(st, gids)


def unsafe_file(st: os.stat_result, owners: set[int], gids: set[int]) -> str | None:
    """Why a regular file may say what someone other than `owners` wanted, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid not in owners:
        return f"it is owned by {user_label(st.st_uid)}"
    return _writers(st, gids)


def user_label(uid: int) -> str:
    """`uid 1001 (alice)` for messages; the number alone for a uid with no account."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
