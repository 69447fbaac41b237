"""Issue 24: on a machine running the service, `make test` fired the production hooks of
/etc/trainsup/trainsup.yaml and took its metrics port, because every test daemon read it.
This plants such a file (in a private mount namespace: an overlay on /etc, the host's /etc
untouched), holds its metrics port, and runs daemon-starting tests of the suite there."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

# Quick tests that start real daemons, crash jobs (hook events) and use the CLI.
INNER_TESTS = ["tests/integration/test_control_socket.py", "tests/integration/test_daemon_lifecycle.py"]


def test_suite_daemons_ignore_a_production_config_with_hooks_and_a_metrics_port(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private mount namespace for the planted /etc/trainsup)")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    fired = tmp_path / "production-hook-fired"
    planted = tmp_path / "trainsup.yaml"
    planted.write_text(textwrap.dedent(f"""\
        hooks:
          - command: ["/bin/sh", "-c", "echo $TRAINSUP_EVENT >> {fired}"]
        metrics:
          listen: 127.0.0.1:{port}
        """))
    probe_jobs = tmp_path / "probe-jobs"
    probe_jobs.mkdir()
    script = textwrap.dedent(f"""\
        set -e
        mkdir -p {tmp_path}/ovl && mount -t tmpfs trainsup-test {tmp_path}/ovl
        mkdir {tmp_path}/ovl/upper {tmp_path}/ovl/work
        mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp_path}/ovl/upper,workdir={tmp_path}/ovl/work /etc
        mkdir -p /etc/trainsup && cp {planted} /etc/trainsup/trainsup.yaml
        # The plant works: a daemon given no config reads it and cannot take the held port.
        set +e
        env -u TRAINSUP_CONFIG {sys.executable} -m trainsup --socket {tmp_path}/probe.sock daemon \\
            --jobs {probe_jobs} --state {tmp_path}/probe-state > {tmp_path}/probe.out 2>&1
        echo "probe exit $?"
        set -e
        exec {sys.executable} -m pytest -q -p no:cacheprovider -x {" ".join(INNER_TESTS)}
        """)
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                           capture_output=True, text=True, timeout=600, cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        holder.close()
    probe_out = (tmp_path / "probe.out").read_text() if (tmp_path / "probe.out").exists() else ""
    assert "probe exit 2" in r.stdout and f"127.0.0.1:{port}" in probe_out, r.stdout + r.stderr + probe_out
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert not fired.exists(), f"a test daemon ran the production hook: {fired.read_text()}"
    assert os.path.exists("/etc/trainsup/trainsup.yaml") is False or \
        open("/etc/trainsup/trainsup.yaml").read() != planted.read_text(), "the plant leaked to the host"
