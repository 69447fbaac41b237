"""`slurm:` keys (FILE:LINE errors like every other key), the batch script `trainsup slurm
submit` writes, and the env:// variables each srun task gets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from trainsup.cli.slurm import BatchScriptError, batch_script, sbatch_time
from trainsup.config.files import load_job_file
from trainsup.slurm.allocation import Allocation, parse_fields
from trainsup.slurm.task import env_for_rank
from trainsup.spec import InvalidJob, JobSpec, SlurmSpec


def _job(tmp_path: Path, body: str):
    f = tmp_path / "j.yaml"
    f.write_text("name: j\ncommand: [python, train.py]\n" + body)
    return f, load_job_file(f, is_root=False)


def test_slurm_keys_parse(tmp_path):
    _, job = _job(tmp_path, "emergency_save: {grace: 40}\nslurm:\n  nodes: 2\n  ntasks_per_node: 4\n"
                            "  time: 2h\n  partition: gpu\n  sbatch_args: [--exclusive]\n  signal_margin: 1m\n")
    assert isinstance(job, JobSpec)
    assert job.slurm == SlurmSpec(nodes=2, ntasks_per_node=4, time=7200.0, partition="gpu",
                                  sbatch_args=("--exclusive",), signal_margin=60.0)


def test_bad_slurm_keys_are_one_line_each_with_file_and_line(tmp_path):
    f, job = _job(tmp_path, "slurm:\n  nodes: 0\n  time: 30s\n  node: 2\n")
    assert isinstance(job, InvalidJob)
    assert any(e.startswith(f"{f}:4: slurm.nodes: ") for e in job.errors), job.errors
    assert any(e.startswith(f"{f}:5: slurm.time: ") for e in job.errors), job.errors
    assert any(e.startswith(f"{f}:6: slurm.node: unknown key; did you mean 'nodes'") for e in job.errors)


def test_batch_script_requeues_signals_before_the_limit_and_execs_trainsup(tmp_path):
    _, job = _job(tmp_path, "emergency_save: {grace: 10}\nslurm: {nodes: 2, time: 90s, partition: low, "
                            "signal_margin: 20, sbatch_args: [--exclusive]}\n")
    script = batch_script(job, tmp_path / "state")
    lines = script.splitlines()
    for want in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@30", "#SBATCH --open-mode=append",
                 "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=2",
                 "#SBATCH --partition=\"low\"", "#SBATCH --exclusive", "trap '' USR1 TERM"):
        assert want in lines, script
    assert lines[-1].startswith(f"exec {sys.executable} -m trainsup run --slurm on")
    assert sbatch_time(60) == "1" and sbatch_time(61) == "2"


def test_srun_wrapping_one_task_per_rank_through_the_step_leader(tmp_path):
    _, job = _job(tmp_path, "env: {A: b}\n")
    wrapped = Allocation("7", nodes=2, ntasks_per_node=2, master_addr="10.0.0.1").wrap(job)
    cmd = list(wrapped.command)
    assert cmd[1:4] == ["-m", "trainsup.slurm.step", "srun"]
    assert "--ntasks=4" in cmd and "--ntasks-per-node=2" in cmd and "--kill-on-bad-exit=1" in cmd
    assert cmd[-2:] == ["python", "train.py"] and "torchrun" not in " ".join(cmd)
    assert dict(wrapped.env) == {"A": "b", "MASTER_ADDR": "10.0.0.1"}


def test_task_env_from_slurm_and_a_port_per_attempt():
    base = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NODEID": "1", "SLURM_JOB_ID": "42", "TRAINSUP_ATTEMPT": "1"}
    env = env_for_rank(base)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["NODE_RANK"]) == ("3", "4", "1", "1")
    again = env_for_rank({**base, "TRAINSUP_ATTEMPT": "2"})
    assert again["MASTER_PORT"] != env["MASTER_PORT"]
    assert env_for_rank({**base, "RANK": "0"})["RANK"] == "0"      # the job's own value wins


def test_scontrol_fields():
    f = parse_fields("JobId=5 JobName=x JobState=RUNNING Reason=None Restarts=2 PreemptTime=None")
    assert f["JobState"] == "RUNNING" and f["Restarts"] == "2" and f["PreemptTime"] == "None"


def test_checkpoint_rescan_and_rotate_keys(tmp_path):
    from trainsup.spec import rotates
    _, job = _job(tmp_path, "checkpoint: {dir: ck, rescan: 2s, rotate: false}\n")
    assert job.checkpoint.rescan == 2.0 and job.checkpoint.rotate is False and not rotates(job)
    _, job = _job(tmp_path, "env: {NODE_RANK: '1'}\ncheckpoint: {dir: ck}\n")
    assert job.checkpoint.rotate is None and not rotates(job)      # auto: not node 0
    _, job = _job(tmp_path, "env: {NODE_RANK: '0'}\ncheckpoint: {dir: ck}\n")
    assert rotates(job)
    f, job = _job(tmp_path, "checkpoint: {dir: ck, rescan: 0s}\n")
    assert isinstance(job, InvalidJob) and job.errors[0].startswith(f"{f}:3: checkpoint.rescan: ")


def test_batch_script_quotes_sbatch_values_a_space_in_a_path_stays_one_value(tmp_path):
    """Found: `#SBATCH --chdir=/data/my run` — sbatch splits an unquoted line at spaces."""
    work = tmp_path / "my run #2"
    _, job = _job(tmp_path, f"workdir: '{work}'\nslurm: {{partition: 'low prio'}}\n")
    lines = batch_script(job, tmp_path / "state 1").splitlines()
    assert f'#SBATCH --chdir="{work}"' in lines, lines
    assert f'#SBATCH --output="{tmp_path}/state 1/slurm-%j.out"' in lines, lines
    assert '#SBATCH --partition="low prio"' in lines, lines
    _, job = _job(tmp_path, 'workdir: \'/x/a"b\\c\'\n')
    assert '#SBATCH --chdir="/x/a\\"b\\\\c"' in batch_script(job, tmp_path).splitlines()


def test_slurm_submit_newline_in_workdir_is_refused_before_anything_is_written(tmp_path):
    """Found: a newline in a workdir ended the `#SBATCH --chdir` line and put a shell command
    of the user's choosing into the batch script (run by the batch shell). `trainsup slurm
    submit` through the real CLI: one line, exit 2, no script, no sbatch."""
    import os
    import subprocess
    pwned = tmp_path / "pwned"
    job = tmp_path / "j.yaml"
    job.write_text(f'name: j\ncommand: [python, train.py]\nworkdir: "{tmp_path}/w\\ntouch {pwned}"\n')
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), PATH="/nonexistent")
    r = subprocess.run([sys.executable, "-m", "trainsup", "slurm", "submit", str(job), "--state", str(state)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainsup: workdir ") and "control character" in lines[0], r.stderr
    assert not (state / "slurm-batch.sh").exists() and not pwned.exists()
    for bad in ("--gres=gpu:1\nrm -rf ~", "x\r"):
        _, spec = _job(tmp_path, f"slurm: {{sbatch_args: [{json.dumps(bad)}]}}\n")
        with pytest.raises(BatchScriptError, match="control character"):
            batch_script(spec, tmp_path)
