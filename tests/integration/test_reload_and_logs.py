"""reload (add, remove, change), bad job files next to good ones, logs, resume_args."""

from __future__ import annotations

import json
import socket
import sys

from conftest import wait_for


def test_bad_files_show_as_invalid_with_file_line_errors_while_a_good_job_runs(daemon):
    daemon.fakejob("good", "--catch-usr1", ckpt=False)
    daemon.write_job("typo", "name: typo\ncommand: [\"true\"]\nrestart:\n  polcy: always\n")
    daemon.write_job("bomb", "a: &a [x, x]\nb: &b [*a, *a]\nname: bomb\n")
    daemon.write_job("pyobj", "name: pyobj\ncommand: !!python/object/apply:os.system [\"touch /tmp/pwned\"]\n")
    daemon.write_job("empty", "")
    daemon.start()
    daemon.wait_ready("good")
    r = daemon.cli("status")
    assert r.returncode == 3, r.stdout
    states = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:] if line and not line.startswith(" ")}
    assert states == {"good": "running", "typo": "invalid", "bomb": "invalid", "pyobj": "invalid", "empty": "invalid"}
    errs = {j["name"]: j["error"] for j in json.loads(daemon.cli("status", "--json").stdout)["jobs"]}
    assert errs["typo"].startswith(f"{daemon.jobs}/typo.yaml:4: restart.polcy: unknown key")
    assert "did you mean 'policy'" in errs["typo"]
    assert errs["bomb"].startswith(f"{daemon.jobs}/bomb.yaml:1:")
    assert "anchors" in errs["bomb"]
    assert errs["pyobj"].startswith(f"{daemon.jobs}/pyobj.yaml:2:")
    assert f"{daemon.jobs}/empty.yaml:1:" in errs["empty"]
    r = daemon.cli("validate", str(daemon.jobs / "typo.yaml"), str(daemon.jobs / "good.yaml"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[0].startswith(f"{daemon.jobs}/typo.yaml:4: restart.polcy:")


def test_reload_adds_removes_and_restarts_changed_jobs(daemon):
    daemon.fakejob("stay", "--catch-usr1", ckpt=False)
    daemon.fakejob("go", "--catch-usr1", ckpt=False)
    daemon.fakejob("change", "--catch-usr1", ckpt=False)
    daemon.start()
    for n in ("stay", "go", "change"):
        daemon.wait_ready(n)
    stay_pid = daemon.status("stay")["pid"]
    (daemon.jobs / "go.yaml").unlink()
    daemon.fakejob("change", "--catch-usr1", ckpt=False, extra="stop_timeout: 3s\n")
    daemon.fakejob("new", "--catch-usr1", ckpt=False)
    r = daemon.cli("reload")
    assert r.returncode == 0, r.stderr
    assert "added: new" in r.stdout and "removed: go" in r.stdout and "changed: change" in r.stdout
    daemon.wait_ready("new")
    daemon.wait_ready("change", 2)
    assert daemon.status("stay")["pid"] == stay_pid
    assert daemon.request("status", "go")["ok"] is False
    # SIGHUP does the same.
    daemon.fakejob("hup", "--catch-usr1", ckpt=False)
    daemon.proc.send_signal(1)
    daemon.wait_ready("hup")


def test_logs_tail_and_follow(daemon):
    daemon.write_job("talk", f"name: talk\ncommand: [{json.dumps(sys.executable)}, -u, -c, "
                             "\"import time\\nfor i in range(100000):\\n  print('line', i, flush=True); time.sleep(0.05)\"]\n")
    daemon.start()
    wait_for(lambda: "line 5" in daemon.cli("logs", "talk", "-n", "3").stdout, 10, "log lines")
    out = daemon.cli("logs", "talk", "-n", "3").stdout
    lines = [l for l in out.splitlines() if l.startswith("line")]
    assert len(lines) <= 3
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(json.dumps({"cmd": "logs", "job": "talk", "args": {"n": 0, "follow": True}}).encode() + b"\n")
    s.settimeout(10)
    buf = b""
    while buf.count(b"\n") < 4:
        buf += s.recv(65536)
    s.close()
    texts = "".join(json.loads(l)["result"]["text"] for l in buf.splitlines()[:4])
    assert "line" in texts


def test_resume_args_are_templated_only_when_a_checkpoint_exists(daemon):
    from trainsup.checkpoint import write_checkpoint
    # A job that records its argv; checkpoint.dir is relative to the YAML file's folder.
    daemon.write_job("args", f"name: args\ncommand: [{json.dumps(sys.executable)}, -c, "
                             "\"import sys,json,time; open(sys.argv[1],'a').write(json.dumps(sys.argv[2:])+'\\\\n'); time.sleep(60)\", "
                             f"{json.dumps(str(daemon.root / 'argv.rec'))}]\n"
                             "checkpoint:\n  dir: args-ckpt\n  resume_args: [\"--resume\", \"{checkpoint}\"]\n"
                             "stop_timeout: 1s\n")
    daemon.start()
    rec = daemon.root / "argv.rec"
    wait_for(lambda: rec.exists() and rec.read_text(), 10, "first launch")
    assert json.loads(rec.read_text().splitlines()[0]) == []
    ck = write_checkpoint(daemon.jobs / "args-ckpt", 3, {"w": b"1"})
    wait_for(lambda: daemon.status("args")["checkpoint"]["step"] == 3, 10, "the checkpoint to be indexed")
    assert daemon.request("restart", "args", no_save=True)["ok"]
    wait_for(lambda: len(rec.read_text().splitlines()) == 2, 10, "second launch")
    assert json.loads(rec.read_text().splitlines()[1]) == ["--resume", str(ck)]
