"""`user: nobody` (daemon as root): the job runs with nobody's uid, gid and groups (not
root's), no capabilities, and a clean environment. Read from /proc of the live job."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

PY = "/usr/bin/python3"


def _needs():
    if os.geteuid() != 0:
        pytest.skip("privilege drop needs a root daemon")
    if not os.access(PY, os.X_OK):
        pytest.skip(f"{PY} (world-executable) is needed: the venv under /root is not nobody's")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


def _status_fields(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.split()
    return out


def test_job_as_nobody_has_nobodys_ids_no_caps_and_a_clean_env(daemon):
    pw = _needs()
    work = Path(tempfile.mkdtemp(prefix="trainsup-priv-"))
    try:
        os.chmod(work, 0o755)
        daemon.write_job("drop", f"name: drop\ncommand: [{PY}, -c, 'import time; time.sleep(120)']\n"
                                 f"workdir: {work}\nuser: nobody\nenv: {{JOB_VAR: \"yes\"}}\n")
        daemon.start(env={"SECRET_TOKEN": "s3cret", "LD_PRELOAD": "", "PYTHONPATH": str(Path.cwd()),
                          "CUDA_VISIBLE_DEVICES": "0"})
        st = daemon.wait_state("drop", "running")
        pid = st["pid"]
        f = _status_fields(pid)
        assert f["Uid"] == [str(pw.pw_uid)] * 4, f["Uid"]
        assert f["Gid"] == [str(pw.pw_gid)] * 4, f["Gid"]
        want_groups = sorted(os.getgrouplist("nobody", pw.pw_gid))
        assert sorted(int(g) for g in f["Groups"]) == want_groups
        assert "0" not in f["Groups"], "root's supplementary groups leaked"
        for cap in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
            assert int(f[cap][0], 16) == 0, f"{cap} {f[cap]}"
        env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if e)
        assert env["USER"] == env["LOGNAME"] == "nobody"
        assert env["HOME"] == pw.pw_dir
        assert env["JOB_VAR"] == "yes" and env["TRAINSUP_JOB"] == "drop"
        for leaked in ("SECRET_TOKEN", "LD_PRELOAD", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "SUDO_USER"):
            assert leaked not in env, f"{leaked} leaked into the job's environment"
        assert set(env) <= {"PATH", "LANG", "TZ", "HOME", "USER", "LOGNAME", "SHELL", "JOB_VAR"} | \
            {k for k in env if k.startswith(("LC_", "TRAINSUP_"))}, sorted(env)
    finally:
        daemon.terminate()
        shutil.rmtree(work, ignore_errors=True)
