"""Config values have ranges, `~` expands, users resolve at load, half-written files wait
(issue 10). Real files in a temp dir; the loader is the one the daemon uses."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time

import pytest
from conftest import REPO, scaled
from trainsup.config.files import load_job_file, scan_jobs_dir, validate_files
from trainsup.config.yaml import MAX_SIZE
from trainsup.spec import InvalidJob, JobSpec


def _job(tmp_path, body: str, name: str = "j"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ncommand: [sleep, '1']\n" + body)
    return path, load_job_file(path, is_root=os.geteuid() == 0)


def _errors(job) -> list[str]:
    assert isinstance(job, InvalidJob), job
    return list(job.errors)


@pytest.mark.parametrize("body,line,key", [
    ("restart: {backoff: {factor: 1.0e+300}}\n", 3, "restart.backoff.factor"),
    ("restart: {backoff: {factor: 11}}\n", 3, "restart.backoff.factor"),
    ("memory: {limit: " + "9" * 400 + "}\n", 3, "memory.limit"),
    ("memory: {limit: 2EiB}\n", 3, "memory.limit"),
    ("checkpoint: {dir: c, keep_last: " + "7" * 40 + "}\n", 3, "checkpoint.keep_last"),
    ("checkpoint: {dir: c, keep_last: 1000001}\n", 3, "checkpoint.keep_last"),
    ("restart: {max_restarts: 99999999}\n", 3, "restart.max_restarts"),
    ("stop_timeout: 31d\n", 3, "stop_timeout"),
    ("hang: {timeout: 1e12}\n", 3, "hang.timeout"),
    ("restart: {window: " + "1" * 5000 + "}\n", 3, "restart.window"),
])
def test_absurd_values_are_rejected_with_file_and_line(tmp_path, body, line, key):
    path, job = _job(tmp_path, body)
    errors = _errors(job)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:{line}: {key}: "), errors


def test_400_digit_memory_limit_is_rejected_not_silently_accepted(tmp_path):
    _, job = _job(tmp_path, "memory: {limit: " + "4" * 400 + "}\n")
    assert "too large" in _errors(job)[0]


def test_5000_digit_integer_makes_only_that_file_invalid(tmp_path):
    (tmp_path / "huge.yaml").write_text("name: huge\ncommand: [sleep, '1']\nstop_timeout: " + "5" * 5000 + "\n")
    (tmp_path / "fine.yaml").write_text("name: fine\ncommand: [sleep, '1']\n")
    for name in ("huge.yaml", "fine.yaml"):
        os.utime(tmp_path / name, (time.time() - 5, time.time() - 5))     # settled
    scan = scan_jobs_dir(tmp_path, is_root=os.geteuid() == 0)
    assert [j.name for j in scan.jobs] == ["fine"]
    assert [j.name for j in scan.invalid] == ["huge"]
    assert scan.invalid[0].errors[0].startswith(f"{tmp_path / 'huge.yaml'}:3: stop_timeout: ")


def test_sizes_up_to_2_to_the_60_are_fine(tmp_path):
    _, job = _job(tmp_path, f"memory: {{limit: {MAX_SIZE}}}\n")
    assert isinstance(job, JobSpec) and job.memory.limit == MAX_SIZE


def test_huge_number_in_a_command_is_just_text(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: j\ncommand: [echo, " + "8" * 5000 + "]\n")
    job = load_job_file(path, is_root=os.geteuid() == 0)
    assert isinstance(job, JobSpec) and job.command[1] == "8" * 5000


def test_tilde_expands_to_the_daemons_home_without_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, job = _job(tmp_path, "workdir: ~/runs\ncheckpoint: {dir: ~/ckpt}\n")
    assert isinstance(job, JobSpec)
    assert job.workdir == tmp_path / "home" / "runs"
    assert job.checkpoint.dir == tmp_path / "home" / "ckpt"


@pytest.mark.skipif(os.geteuid() != 0, reason="user: needs a root daemon")
def test_tilde_expands_to_the_job_users_home_and_ids_resolve_at_load(tmp_path):
    nobody = pwd.getpwnam("nobody")
    _, job = _job(tmp_path, "user: nobody\nworkdir: '~'\ncheckpoint: {dir: ~/ck}\n")
    assert isinstance(job, JobSpec)
    assert str(job.workdir) == os.path.normpath(nobody.pw_dir)
    assert str(job.checkpoint.dir) == os.path.normpath(os.path.join(nobody.pw_dir, "ck"))
    assert (job.uid, job.gid, job.home) == (nobody.pw_uid, nobody.pw_gid, type(job.home)(nobody.pw_dir))
    assert nobody.pw_gid in job.groups


def test_no_directory_literally_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _, job = _job(tmp_path, "workdir: '~'\n")     # quoted: a bare ~ is YAML's null
    assert job.workdir == tmp_path / "home"


def test_validate_on_missing_workdir_and_command(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text(f"name: a\ncommand: [sleep, '1']\nworkdir: {tmp_path / 'nope'}\n")
    b = tmp_path / "b.yaml"
    b.write_text("name: b\ncommand: [no-such-program-xyz, '1']\n")
    c = tmp_path / "c.yaml"
    c.write_text("name: c\ncommand: [./train.sh]\n")
    d = tmp_path / "d.yaml"
    d.write_text("name: d\ncommand: [sleep, '1']\nenv: {PATH: /nonexistent}\n")
    errors = validate_files([a, b, c, d], is_root=os.geteuid() == 0, runnable=True)
    assert errors == [
        f"{a}:3: workdir: {tmp_path / 'nope'} does not exist",
        f"{b}:2: command: 'no-such-program-xyz' is not found on the job's PATH ({os.environ['PATH']})",
        f"{c}:2: command: './train.sh' is not an executable file (looked at {tmp_path / 'train.sh'})",
        f"{d}:2: command: 'sleep' is not found on the job's PATH (/nonexistent)",
    ]
    (tmp_path / "train.sh").write_text("#!/bin/sh\n")
    (tmp_path / "train.sh").chmod(0o755)
    assert validate_files([c], is_root=os.geteuid() == 0, runnable=True) == []
    # The CLI: one line each, exit 1.
    r = subprocess.run([sys.executable, "-m", "trainsup", "validate", str(a), str(b)], capture_output=True,
                       text=True, timeout=scaled(60), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 2, r.stderr


def test_a_file_written_moments_ago_is_unsettled(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: j\ncommand: [sleep, '1']\nrestart:\n")   # a valid prefix
    scan = scan_jobs_dir(tmp_path, is_root=os.geteuid() == 0)
    assert (scan.jobs, scan.invalid, scan.unsettled) == ([], [], [path])
    past = time.time() - 1
    os.utime(path, (past, past))
    scan = scan_jobs_dir(tmp_path, is_root=os.geteuid() == 0)
    assert [j.name for j in scan.jobs] == ["j"] and scan.unsettled == []
