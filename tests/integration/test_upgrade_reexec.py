"""The upgrade path (issue 21): version N installed into a virtualenv (a real `pip install`
of this source, the shim compiled at install), its daemon running jobs; version N+1 (the
same source with another version string) installed over it; `trainsup reexec`. The new
version answers `trainsup --version` over the socket with the daemon's old pid, the jobs'
processes are the same ones, and their steps go on.

The virtualenv gets its dependencies from this checkout's .venv through a .pth file
(nothing is downloaded); the daemon runs from the virtualenv's own console script, with
no PYTHONPATH, so the code it runs is the installed one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import psutil
import pytest
from conftest import FAKEJOB, REPO, read_records, wait_for
from trainsup import __version__
from trainsup.daemon.launch import shim

pytestmark = [pytest.mark.skipif(shim.why_unavailable() is not None, reason=f"no shim: {shim.why_unavailable()}"),
              pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to install trainsup with"),
              pytest.mark.timeout(600)]

NEXT = __version__ + ".post1"


def _source(dest: Path, version: str) -> Path:
    """This checkout's source, as an sdist would carry it, with `version` written in."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "supervisor", dest / "supervisor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "trainsup-shim", "*.pyc"))
    for rel in ("pyproject.toml", "supervisor/__init__.py"):
        p = dest / rel
        text = p.read_text()
        assert f'"{__version__}"' in text, rel
        p.write_text(text.replace(f'"{__version__}"', f'"{version}"', 1))
    return dest


def _install(venv: Path, src: Path) -> None:
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--no-build-isolation", str(src)], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (venv / "bin" / "trainsup").exists()


def _venv(root: Path) -> Path:
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                                  check=True).stdout.strip())
    # The dependencies (and pip, setuptools) of this checkout's .venv, after the venv's own
    # site-packages: what is installed into the venv comes first.
    ours = {p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()}
    (purelib / "zz_trainsup_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


class Daemon:
    def __init__(self, root: Path, venv: Path):
        self.root, self.venv = root, venv
        self.socket = root / "trainsup.sock"
        self.jobs = root / "jobs"
        self.jobs.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
        self.out = open(root / "daemon.out", "ab")
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "trainsup"), "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=600, env=self.env)

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.venv / "bin" / "trainsup"), "--socket", str(self.socket), "daemon",
                                      "--jobs", str(self.jobs), "--state", str(self.root / "state"),
                                      "--log-dir", str(self.root / "logs")],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=self.env)
        wait_for(lambda: self.cli("pid").returncode == 0, 60, "the installed daemon to answer", proc=self.proc,
                 detail=lambda: (self.root / "daemon.out").read_text()[-2000:])

    def status(self) -> dict:
        r = self.cli("status", "--json")
        assert r.returncode in (0, 3), r.stderr
        return {j["name"]: j for j in json.loads(r.stdout)["jobs"]}


def test_upgrade_in_place_with_reexec(tmp_path):
    venv = _venv(tmp_path)
    _install(venv, _source(tmp_path / "n", __version__))
    d = Daemon(tmp_path, venv)
    progress = {}
    for name in ("alpha", "beta"):
        progress[name] = tmp_path / f"{name}.step"
        cmd = [sys.executable, str(FAKEJOB), "--record", str(tmp_path / f"{name}.rec"), "--catch-usr1",
               "--progress", str(progress[name]), "--print-every", "0.05"]
        (d.jobs / f"{name}.yaml").write_text(
            f"name: {name}\ncommand: {json.dumps(cmd)}\nworkdir: {tmp_path}\n"
            f"env: {{PYTHONPATH: {json.dumps(str(REPO))}}}\ncheckpoint:\n  dir: {tmp_path / (name + '-ck')}\n")
    try:
        d.start()
        assert d.proc is not None
        before = wait_for(lambda: (s := d.status()) and all(j["state"] == "running" for j in s.values()) and s,
                          30, "both jobs running")
        wait_for(lambda: all(p.exists() for p in progress.values()), 30, "the jobs stepping")
        first = d.cli("--version").stdout.splitlines()
        assert first == [f"trainsup {__version__}",
                         f"daemon: trainsup {__version__} (pid {d.proc.pid}) at {d.socket}"], first

        _install(venv, _source(tmp_path / "n1", NEXT))
        r = d.cli("reexec")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{__version__} -> {NEXT}" in r.stdout and "2 running jobs kept" in r.stdout, r.stdout
        assert d.cli("--version").stdout.splitlines() == [
            f"trainsup {NEXT}", f"daemon: trainsup {NEXT} (pid {d.proc.pid}) at {d.socket}"]
        assert d.proc.poll() is None
        after = d.status()
        steps = {n: int(p.read_text()) for n, p in progress.items()}
        for name, was in before.items():
            now = after[name]
            assert (now["pid"], now["attempt"], now["state"], now["adopted"]) == (was["pid"], 1, "running", True)
            assert [r["event"] for r in read_records(tmp_path / f"{name}.rec")] == ["start"]
            # Its shim was started by version N and is still the daemon's child.
            assert psutil.Process(psutil.Process(now["pid"]).ppid()).ppid() == d.proc.pid
        wait_for(lambda: all(int(p.read_text()) > steps[n] + 10 for n, p in progress.items()), 20,
                 "the jobs' steps going on")
        # Version N+1 launches jobs too (its own shim, compiled by its install).
        r = d.cli("restart", "beta", "--no-save")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: d.status()["beta"]["attempt"] == 2 and d.status()["beta"]["state"] == "running", 30,
                 "beta relaunched by the new version")
        r = d.cli("stop", "all")
        assert r.returncode == 0, r.stderr
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(60)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        for name in ("alpha", "beta"):
            for rec in read_records(tmp_path / f"{name}.rec"):
                try:
                    os.kill(rec["pid"], signal.SIGKILL)
                except OSError:
                    pass
        d.out.close()
