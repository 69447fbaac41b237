"""systemd integration (SPEC sections 2 and 10), against a real `systemd --user`.

The unit under test is systemd/trainsup.service itself, installed unchanged in the test
manager; a drop-in replaces only the ExecStart binary (the documented way to point it at a
virtualenv) and puts this checkout first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from systemd_harness import UserManager, user_manager, wait_for  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO / "systemd" / "trainsup.service"
# The daemon is reached through the CLI (`trainsup daemon`), so both must have landed.
DAEMON_PRESENT = all((REPO / "supervisor" / f).exists() for f in ("daemon/loop.py", "cli/main.py"))

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(120)]


def service_settings(text: str) -> dict[str, str]:
    """The [Service] section's settings, last assignment wins (as systemd reads it)."""
    section, settings = None, {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def _all(text: str, key: str) -> list[str]:
    """Every value of a [Service] setting, in order (ExecStartPre= may repeat)."""
    return [line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{key}=")]


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def trainsup_executable() -> str:
    script = Path(sys.executable).parent / "trainsup"
    if not script.exists():
        pytest.skip(f"no trainsup console script next to {sys.executable}; pip install -e .")
    return str(script)


# -- the unit file on its own -------------------------------------------------------------

def test_unit_file_has_the_settings_the_spec_requires():
    s = service_settings(UNIT_FILE.read_text())
    assert s["Type"] == "notify"
    assert s["NotifyAccess"] == "main"
    assert re.match(r"^/\S+/trainsup daemon( |$)", s["ExecStart"]), s["ExecStart"]
    # A reload through the socket: `systemctl reload` fails when the reload failed.
    assert re.match(r"^/\S+/trainsup reload$", s["ExecReload"]), s["ExecReload"]
    assert "Documentation" in UNIT_FILE.read_text()
    # `process`: a daemon that dies must not take its jobs with it; a stop still
    # stops them (the daemon does, and waits for their cgroups).
    assert s["KillMode"] == "process"
    assert s["Restart"] == "on-failure"
    assert seconds(s["WatchdogSec"]) > 0
    for key in ("RuntimeDirectory", "StateDirectory", "LogsDirectory",
                "ConfigurationDirectory"):
        assert s[key] == "trainsup", key
    # PrivateTmp would hide users' /tmp from their training jobs.
    assert s.get("PrivateTmp", "no") == "no"
    assert s.get("OOMPolicy") == "continue"


def test_stop_timeout_outlasts_the_default_save_and_stop():
    from trainsup.spec import EmergencySaveSpec, JobSpec

    stop_timeout = JobSpec.__dataclass_fields__["stop_timeout"].default
    needed = EmergencySaveSpec().grace + stop_timeout
    assert seconds(service_settings(UNIT_FILE.read_text())["TimeoutStopSec"]) > needed


def test_systemd_analyze_verify_passes(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists; point it at this venv's trainsup.
    text = UNIT_FILE.read_text()
    text, n = re.subn(r"(?m)^(Exec\w+=)/usr/local/bin/trainsup ", rf"\g<1>{trainsup_executable()} ", text)
    assert n == 3, "ExecStartPre=, ExecStart= and ExecReload= lines not found in the unit"
    unit = tmp_path / "trainsup.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60)
    complaints = [line for line in (r.stdout + r.stderr).splitlines()
                  if "trainsup.service" in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


# -- the harness itself ---------------------------------------------------------------------

SMOKE = textwrap.dedent("""\
    import os, signal, sys, time
    from pathlib import Path
    from trainsup.daemon.sdnotify import Notifier
    time.sleep(1.0)  # a slow start: `systemctl start` must still wait for READY=1
    Path(sys.argv[1]).write_text(str(os.getpid()))
    Notifier.from_env().ready(status="smoke ready")
    signal.pause()
""")


def test_start_waits_for_ready_and_stop_stops(user_manager: UserManager, tmp_path):
    um = user_manager
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE)
    marker = tmp_path / "ready-pid"
    name = f"trainsup-smoke-{uuid.uuid4().hex[:8]}.service"
    um.install_unit(name, textwrap.dedent(f"""\
        [Unit]
        Description=trainsup harness smoke test
        [Service]
        Type=notify
        NotifyAccess=main
        Environment=PYTHONPATH={REPO}
        ExecStart={sys.executable} {script} {marker}
        TimeoutStartSec=20s
        """))

    started = time.monotonic()
    um.systemctl("start", name)
    took = time.monotonic() - started
    assert marker.exists(), f"start returned before READY=1\n{um.diagnostics(name)}"
    assert took >= 1.0, f"start returned after {took:.2f}s, before the service's 1s start"
    props = um.show(name, "ActiveState", "SubState", "MainPID", "StatusText")
    pid = int(marker.read_text())
    assert props == {"ActiveState": "active", "SubState": "running",
                     "MainPID": str(pid), "StatusText": "smoke ready"}, um.diagnostics(name)

    um.systemctl("stop", name)
    assert um.show(name, "ActiveState")["ActiveState"] == "inactive"
    assert not psutil.pid_exists(pid)


# -- the real daemon ------------------------------------------------------------------------

JOB_SCRIPT = textwrap.dedent("""\
    import os, signal, sys, time
    from pathlib import Path

    here = Path(__file__).resolve().parent
    name = os.environ["TRAINSUP_JOB"]
    pending = []
    # The handler only records the request; the loop below does the work.
    signal.signal(signal.SIGUSR1, lambda signum, frame: pending.append(signum))
    tmp = here / f"{name}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, here / f"{name}.pid")
    step = 0
    while True:
        step += 1
        if pending:
            pending.clear()
            (here / f"{name}.got-sigusr1").write_text(str(step))
            from trainsup.checkpoint.format import write_checkpoint
            write_checkpoint(os.environ["TRAINSUP_CHECKPOINT_DIR"], step,
                             {"state.bin": b"x" * 64}, reason="preempt")
        time.sleep(0.05)
""")


def job_yaml(name: str, workdir: Path) -> str:
    return textwrap.dedent(f"""\
        name: {name}
        command:
          - "{sys.executable}"
          - "{workdir / 'job.py'}"
        workdir: {workdir}
        env:
          PYTHONPATH: "{REPO}"
        stop_timeout: 5s
        checkpoint:
          dir: {workdir / ('ckpt-' + name)}   # each job its own: a shared dir is refused
        emergency_save:
          grace: 5s
        """)


class DaemonUnit:
    """systemd/trainsup.service installed in a test user manager, plus its job files."""

    def __init__(self, um: UserManager, tmp_path: Path, extra_service: str = "") -> None:
        self.um = um
        self.name = f"trainsup-{uuid.uuid4().hex[:8]}.service"
        self.workdir = tmp_path / "jobs-work"
        self.workdir.mkdir()
        (self.workdir / "job.py").write_text(JOB_SCRIPT)
        # systemd 252 puts a user unit's ConfigurationDirectory= in $XDG_CONFIG_HOME.
        self.jobs_dir = um.config_home / "trainsup" / "jobs.d"
        self.jobs_dir.mkdir(parents=True)
        self.socket = f"{um.runtime_dir}/trainsup/trainsup.sock"
        unit_text = UNIT_FILE.read_text()
        exe = trainsup_executable()
        # The README's virtualenv drop-in: every line naming /usr/local/bin/trainsup replaced.
        exec_lines = "".join(f"{key}=\n" + "".join(f"{key}={re.sub(r'^/usr/local/bin/trainsup', exe, v)}\n"
                                                   for v in _all(unit_text, key))
                             for key in ("ExecStartPre", "ExecStart", "ExecReload"))
        um.install_unit(self.name, unit_text, dropins={"50-test.conf": (
            "[Service]\n" + exec_lines +
            f"Environment=PYTHONPATH={REPO}\n{extra_service}")})

    def add_job(self, name: str) -> None:
        tmp = self.jobs_dir / f".{name}.yaml.tmp"
        tmp.write_text(job_yaml(name, self.workdir))
        os.replace(tmp, self.jobs_dir / f"{name}.yaml")

    def status(self) -> dict:
        r = self.um.run([trainsup_executable(), "status", "--json"], timeout=15,
                        env={"PYTHONPATH": str(REPO), "TRAINSUP_SOCKET": self.socket})
        assert r.returncode in (0, 3), f"trainsup status exited {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def job(self, name: str) -> dict | None:
        return next((j for j in self.status()["jobs"] if j["name"] == name), None)

    def job_pid(self, name: str) -> int:
        pidfile = self.workdir / f"{name}.pid"
        return int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10,
                            f"job {name} to write its pid file\n{self.diagnostics()}"))

    def diagnostics(self) -> str:
        return self.um.diagnostics(self.name)


needs_daemon = pytest.mark.skipif(not DAEMON_PRESENT, reason="daemon not available yet")


@needs_daemon
def test_daemon_under_systemd_saves_jobs_on_stop(user_manager: UserManager, tmp_path):
    unit = DaemonUnit(user_manager, tmp_path)
    unit.add_job("sdjob")

    user_manager.systemctl("start", unit.name, timeout=60)
    props = user_manager.show(unit.name, "ActiveState", "MainPID")
    assert props["ActiveState"] == "active", unit.diagnostics()

    job_pid = unit.job_pid("sdjob")
    job = wait_for(lambda: (j := unit.job("sdjob")) and j["state"] == "running" and j, 10,
                   f"status to show sdjob running\n{unit.diagnostics()}")
    assert job["pid"] == job_pid
    daemon_pid = int(props["MainPID"])
    assert job_pid in {p.pid for p in psutil.Process(daemon_pid).children(recursive=True)}

    user_manager.systemctl("stop", unit.name, timeout=60)

    assert (unit.workdir / "sdjob.got-sigusr1").exists(), (
        f"the job never got the save signal on stop\n{unit.diagnostics()}")
    wait_for(lambda: not psutil.pid_exists(job_pid), 3,
             f"job pid {job_pid} to be gone after stop\n{unit.diagnostics()}")
    after = user_manager.show(unit.name, "ActiveState", "Result", "ExecMainStatus")
    # Result=success rules out systemd's stop timeout (SIGKILL); status 0 rules out dying
    # of the SIGTERM itself (status 15, which systemd also counts as success).
    assert after == {"ActiveState": "inactive", "Result": "success",
                     "ExecMainStatus": "0"}, unit.diagnostics()


@needs_daemon
def test_daemon_reload_reads_new_job_files(user_manager: UserManager, tmp_path):
    unit = DaemonUnit(user_manager, tmp_path)
    unit.add_job("first")
    user_manager.systemctl("start", unit.name, timeout=60)
    unit.job_pid("first")

    unit.add_job("second")
    user_manager.systemctl("reload", unit.name)
    wait_for(lambda: (j := unit.job("second")) and j["state"] == "running", 10,
             f"reload (SIGHUP) to start the new job\n{unit.diagnostics()}")
    second_pid = unit.job_pid("second")

    user_manager.systemctl("stop", unit.name, timeout=60)
    wait_for(lambda: not psutil.pid_exists(second_pid), 3, "second job to be gone after stop")


@needs_daemon
def test_daemon_pings_the_watchdog(user_manager: UserManager, tmp_path):
    # A short WatchdogSec so a daemon that never pings would be killed within the test.
    unit = DaemonUnit(user_manager, tmp_path, extra_service="WatchdogSec=2s\n")
    unit.add_job("wd")
    user_manager.systemctl("start", unit.name, timeout=60)
    main_pid = user_manager.show(unit.name, "MainPID")["MainPID"]

    def last_ping() -> int:
        return int(user_manager.show(unit.name, "WatchdogTimestampMonotonic")
                   ["WatchdogTimestampMonotonic"])

    # systemd moves WatchdogTimestamp on every WATCHDOG=1 it accepts (NotifyAccess=main).
    first = last_ping()
    second = wait_for(lambda: (t := last_ping()) > first and t, 3,
                      f"a WATCHDOG=1 ping\n{unit.diagnostics()}")
    wait_for(lambda: last_ping() > second, 3, f"a second WATCHDOG=1 ping\n{unit.diagnostics()}")
    props = user_manager.show(unit.name, "ActiveState", "MainPID", "NRestarts")
    assert props == {"ActiveState": "active", "MainPID": main_pid, "NRestarts": "0"}, (
        unit.diagnostics())
    user_manager.systemctl("stop", unit.name, timeout=60)


def test_unit_security_exposure_is_at_most_5():
    """Issue 24: the unit scored 9.4 UNSAFE in `systemd-analyze security`."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT_FILE)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 5.0, r.stdout


TOUR_JOB = textwrap.dedent("""\
    name: mine
    command: [/bin/sh, -c, 'id -u > uid; exec sleep 600']
    workdir: {work}
    user: nobody
    """)


@needs_daemon
def test_every_documented_feature_works_under_the_hardened_unit(user_manager: UserManager, tmp_path):
    """The hardening applies to the jobs too: under exactly the shipped unit, a root job and
    a `user:` job run in their cgroups, a requested save is confirmed and rotated, a hook
    runs (in its own cgroup), metrics are scraped, `systemctl reload` fails for a broken
    job file, and a broken daemon config stops `systemctl start` before the daemon runs."""
    import tempfile
    import urllib.request
    um = user_manager
    port = _free_port()
    hooked = tmp_path / "hooked"
    config_dir = um.config_home / "trainsup"
    config_dir.mkdir(parents=True)
    (config_dir / "trainsup.yaml").write_text(
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        f"hooks:\n  - command: [/bin/sh, -c, 'cat /proc/self/cgroup > {hooked}']\n    on: [saved]\n")
    unit = DaemonUnit(um, tmp_path)
    (unit.jobs_dir / "sdjob.yaml").write_text(
        job_yaml("sdjob", unit.workdir).replace("checkpoint:\n", "checkpoint:\n  keep_last: 1\n"))
    work = Path(tempfile.mkdtemp(prefix="trainsup-sd-", dir="/tmp"))    # reachable by nobody
    os.chmod(work, 0o777)
    try:
        (unit.jobs_dir / "mine.yaml").write_text(TOUR_JOB.format(work=work))
        um.systemctl("start", unit.name, timeout=60)
        unit.job_pid("sdjob")
        wait_for(lambda: (work / "uid").exists() and (work / "uid").read_text().strip() == "65534", 15,
                 f"the user: job to run as nobody\n{unit.diagnostics()}")
        st = {j["name"]: j for j in unit.status()["jobs"]}
        assert st["sdjob"]["containment"].startswith("cgroup"), st["sdjob"]
        assert st["mine"]["state"] == "running" and st["mine"]["containment"].startswith("cgroup")
        cli = [trainsup_executable(), "checkpoint", "sdjob", "--wait", "--timeout", "20"]
        env = {"PYTHONPATH": str(REPO), "TRAINSUP_SOCKET": unit.socket}
        for _ in range(2):
            r = um.run(cli, timeout=60, env=env)
            assert r.returncode == 0, r.stdout + r.stderr + unit.diagnostics()
        ckpts = unit.workdir / "ckpt-sdjob"
        wait_for(lambda: len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) == 1, 15,
                 f"rotation to keep the last checkpoint only\n{unit.diagnostics()}")
        wait_for(lambda: hooked.exists() and "/.hook." in hooked.read_text(), 15,
                 f"the saved hook, in its own cgroup\n{unit.diagnostics()}")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'trainsup_job_state{name="mine",state="running"} 1' in body
        # A broken job file: the reload fails, and says why; the job runs on.
        (unit.jobs_dir / "bad.yaml").write_text("name: bad\ncommand: [\n")
        r = um.systemctl("reload", unit.name, check=False)
        assert r.returncode != 0
        assert "bad.yaml:" in unit.um.unit_log(unit.name) + r.stderr, unit.diagnostics()
        (unit.jobs_dir / "bad.yaml").unlink()
        um.systemctl("reload", unit.name)
        um.systemctl("stop", unit.name, timeout=60)
        # A broken daemon config fails the start before the daemon runs, with its line.
        (config_dir / "trainsup.yaml").write_text("metrics:\n  listen: nowhere\n")
        r = um.systemctl("start", unit.name, check=False, timeout=60)
        assert r.returncode != 0
        assert "trainsup.yaml:2: metrics.listen" in um.unit_log(unit.name), unit.diagnostics()
        assert um.show(unit.name, "ExecMainPID")["ExecMainPID"] == "0", "the daemon ran despite its config"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_daemon
def test_daemon_killed_under_systemd_comes_back_and_keeps_its_jobs(user_manager: UserManager, tmp_path):
    """The daemon SIGKILLed (only the daemon: --kill-whom=main) -> systemd restarts
    it (Restart=on-failure) without killing the job in its cgroup (KillMode=process), and
    the new daemon takes the job over: same process, no save asked. `systemctl stop` then
    still saves and stops it."""
    unit = DaemonUnit(user_manager, tmp_path)
    unit.add_job("sdjob")
    user_manager.systemctl("start", unit.name, timeout=60)
    first = int(user_manager.show(unit.name, "MainPID")["MainPID"])
    job_pid = unit.job_pid("sdjob")
    wait_for(lambda: (j := unit.job("sdjob")) and j["state"] == "running", 10,
             f"sdjob running\n{unit.diagnostics()}")

    user_manager.systemctl("kill", "--kill-whom=main", "--signal=KILL", unit.name)
    props = wait_for(lambda: (p := user_manager.show(unit.name, "ActiveState", "MainPID", "NRestarts"))
                     and p["ActiveState"] == "active" and p["MainPID"] not in ("0", str(first)) and p, 30,
                     f"systemd to restart the daemon\n{unit.diagnostics()}")
    assert props["NRestarts"] == "1", unit.diagnostics()
    job = wait_for(lambda: (j := unit.job("sdjob")) and j["state"] == "running" and j, 20,
                   f"the new daemon to take sdjob over\n{unit.diagnostics()}")
    assert (job["pid"], job["attempt"], job["adopted"]) == (job_pid, 1, True), unit.diagnostics()
    assert psutil.pid_exists(job_pid)
    assert not (unit.workdir / "sdjob.got-sigusr1").exists(), "the job was asked for a save"
    assert (unit.workdir / "sdjob.pid").read_text() == str(job_pid)     # never started again

    user_manager.systemctl("stop", unit.name, timeout=60)
    assert (unit.workdir / "sdjob.got-sigusr1").exists(), (
        f"the job never got the save signal on stop\n{unit.diagnostics()}")
    wait_for(lambda: not psutil.pid_exists(job_pid), 3, f"job pid {job_pid} to be gone after stop")
    after = user_manager.show(unit.name, "ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, unit.diagnostics()
