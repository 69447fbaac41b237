"""Issue 15, "CLI conventions": what supervisorctl and systemctl users expect, each verb's
exit code and output checked against a real daemon."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import subprocess
import sys

from conftest import REPO, scaled, wait_for
from trainsup.cli.main import build_parser


def _two_jobs(daemon):
    daemon.fakejob("train", "--catch-usr1 --every 0.5")
    daemon.fakejob("eval", "--catch-usr1 --every 0.5")
    daemon.start()
    daemon.wait_ready("train")
    daemon.wait_ready("eval")


def test_start_and_stop_are_idempotent(daemon):
    _two_jobs(daemon)
    pid = daemon.status("train")["pid"]
    r = daemon.cli("start", "train")
    assert (r.returncode, r.stdout) == (0, f"train: already running (pid {pid})\n"), r.stderr
    r = daemon.cli("stop", "train")
    assert r.returncode == 0 and r.stdout.startswith("train: stopped, saved at step "), r.stdout
    r = daemon.cli("stop", "train")
    assert (r.returncode, r.stdout) == (0, "train: already stopped\n"), r.stderr
    # `start` reports where the launch got to: running, as the README shows (not "starting").
    r = daemon.cli("start", "train")
    assert r.returncode == 0
    assert re.fullmatch(r"train: started \(pid \d+\)\n", r.stdout), r.stdout


def test_several_jobs_and_all(daemon):
    _two_jobs(daemon)
    r = daemon.cli("checkpoint", "train", "eval", "--wait", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [l.split(":")[0] for l in lines] == ["train", "eval"] and all(
        re.fullmatch(r"\w+: checkpoint at step \d+ is valid: \S+", l) for l in lines), lines
    r = daemon.cli("stop", "all", "--no-save")
    assert r.returncode == 0, r.stderr
    assert sorted(l.split(":")[0] for l in r.stdout.splitlines()) == ["eval", "train"]
    assert {daemon.status(n)["state"] for n in ("train", "eval")} == {"stopped"}
    r = daemon.cli("start", "eval", "train")
    assert r.returncode == 0 and [l.split(":")[0] for l in r.stdout.splitlines()] == ["eval", "train"]
    r = daemon.cli("restart", "all")
    assert r.returncode == 0, r.stderr
    r = daemon.cli("preempt", "all")
    assert r.returncode == 0, r.stderr
    assert {daemon.status(n)["state"] for n in ("train", "eval")} == {"preempted"}
    # One bad name: the others are still done, the exit status says something failed.
    r = daemon.cli("start", "train", "nosuch")
    assert r.returncode == 4 and r.stdout.startswith("train: started"), (r.stdout, r.stderr)
    r = daemon.cli("stop", "all", "train")
    assert r.returncode == 2 and "not both" in r.stderr


def test_pid(daemon):
    _two_jobs(daemon)
    r = daemon.cli("pid", "train")
    assert (r.returncode, r.stdout.strip()) == (0, str(daemon.status("train")["pid"]))
    r = daemon.cli("pid")
    assert (r.returncode, r.stdout.strip()) == (0, str(daemon.proc.pid))
    r = daemon.cli("pid", "all")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [f"eval {daemon.status('eval')['pid']}", f"train {daemon.status('train')['pid']}"]
    assert daemon.cli("stop", "eval", "--no-save").returncode == 0
    r = daemon.cli("pid", "eval")
    assert r.returncode == 1 and r.stdout == "" and "eval is not running (state stopped)" in r.stderr
    # Issue 24: `pid all` exited 0 while a job was down (the README says 1).
    r = daemon.cli("pid", "all")
    assert r.returncode == 1 and r.stdout.splitlines()[0] == "eval -", r.stdout


def test_json_on_every_read_command(daemon, tmp_path):
    _two_jobs(daemon)
    wait_for(lambda: daemon.status("train")["checkpoint"]["step"], 10, "a checkpoint")
    for args in (["status"], ["status", "train"], ["checkpoints", "train"], ["history", "train"],
                 ["logs", "train", "-n", "5"]):
        r = daemon.cli(*args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        json.loads(r.stdout)
    hist = json.loads(daemon.cli("history", "train", "--json").stdout)
    assert hist["schema"] == 1 and hist["job"] == "train"
    assert hist["events"][0]["kind"] == "state" and {"at", "kind"} <= set(hist["events"][-1])
    assert isinstance(json.loads(daemon.cli("logs", "train", "--json").stdout)["lines"], list)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncommand: [true]\nbogus: 1\n")
    r = daemon.cli("validate", "--json", str(daemon.jobs / "train.yaml"), str(bad))
    assert r.returncode == 1
    out = json.loads(r.stdout)["files"]
    assert [(o["file"], o["ok"]) for o in out] == [(str(daemon.jobs / "train.yaml"), True), (str(bad), False)]
    assert any("bogus: unknown key" in e for e in out[1]["errors"])


def test_did_you_mean_for_a_typod_job_name(daemon):
    _two_jobs(daemon)
    for args in (["stop", "trian"], ["logs", "trian"], ["status", "trian"], ["history", "evl"]):
        r = daemon.cli(*args)
        assert r.returncode == 4, (args, r.returncode, r.stderr)
        want = "train" if "trian" in args else "eval"
        assert r.stderr.strip().endswith(f"(did you mean {want}?)"), r.stderr
    r = daemon.cli("stop", "zzzzzz")
    assert r.returncode == 4 and "did you mean" not in r.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_option_is_described():
    subs = _subparsers(build_parser())
    assert {"pid", "plot", "daemon", "start", "stop", "history", "logs"} <= set(subs)
    for name, p in subs.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, f"`trainsup {name} --help`: {a.dest} is not described"
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def help_of(cmd):
        return subprocess.run([sys.executable, "-m", "trainsup", cmd, "--help"], capture_output=True,
                              text=True, env=env, timeout=scaled(60)).stdout
    assert "protect" not in help_of("unpin")
    assert "section 12" not in help_of("demo")
    daemon_help = help_of("daemon")
    assert "--socket PATH" in daemon_help and "--config FILE" in daemon_help
    for cmd, flags in (("stop", ["--grace", "--no-save"]), ("logs", ["-n N", "--json", "--follow"]),
                       ("checkpoint", ["--timeout", "--wait"]), ("history", ["-n N", "--json"])):
        text = help_of(cmd)
        assert all(f in text for f in flags), (cmd, text)


def _status_through_a_pty(daemon, env_extra: dict) -> bytes:
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    env.pop("NO_COLOR", None) if "NO_COLOR" not in env_extra else None
    p = subprocess.Popen([sys.executable, "-m", "trainsup", "--socket", str(daemon.socket), "status"],
                         stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:        # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    p.wait(scaled(30))
    os.close(master)
    return out


def test_colour_only_on_a_tty_and_never_with_no_color(daemon):
    _two_jobs(daemon)
    assert b"\x1b[32mrunning" in _status_through_a_pty(daemon, {"TERM": "xterm"})
    assert b"\x1b[" not in _status_through_a_pty(daemon, {"TERM": "xterm", "NO_COLOR": "1"})
    assert "\x1b[" not in daemon.cli("status").stdout          # a pipe


def test_exit_codes_and_words_verb_by_verb_for_one_job_and_all(daemon):
    """Issue 24: stop/preempt exited 0 when no save was confirmed (1 only for `lost`, and
    `preempt all` 0 even then); a job without `checkpoint:` printed `JOB: None`; `pid all`
    exited 0 with a job down. The README's table, checked verb by verb."""
    daemon.fakejob("good", "--catch-usr1 --every 0.5")
    daemon.fakejob("deaf")                       # checkpoint dir, but never catches the save signal
    daemon.fakejob("bare", "--catch-usr1", ckpt=False)      # no checkpoint: at all
    daemon.start()
    for n in ("good", "deaf", "bare"):
        daemon.wait_ready(n)

    def run(*args):
        r = daemon.cli(*args)
        return r.returncode, r.stdout, r.stderr

    assert run("status")[0] == 0
    assert run("status", "good", "deaf")[0] == 0
    assert run("status", "nosuch")[0] == 4
    code, out, _ = run("stop", "deaf")
    assert code == 1 and out.startswith("deaf: stopped, no save confirmed: job does not catch the save signal"), out
    code, out, _ = run("stop", "bare")
    assert code == 1 and out.startswith("bare: stopped, no save confirmed: the job has no checkpoint section"), out
    assert "None" not in out
    assert run("status", "good", "bare")[0] == 3         # a named job not active (systemctl status)
    code, out, _ = run("pid", "all")
    assert code == 1 and "bare -" in out.splitlines()
    code, out, _ = run("checkpoint", "bare")
    assert code == 1
    assert run("start", "all")[0] == 0
    for n in ("deaf", "bare"):
        daemon.wait_ready(n, starts=2)
    code, out, _ = run("stop", "bare", "--no-save")
    assert (code, out) == (0, "bare: stopped without a save (--no-save)\n")
    assert run("stop", "bare")[:2] == (0, "bare: already stopped\n")
    assert run("start", "bare")[0] == 0
    daemon.wait_ready("bare", starts=3)
    code, out, _ = run("preempt", "all")
    lines = sorted(out.splitlines())
    assert code == 1, out
    assert lines[0].startswith("bare: preempted, no save confirmed") and \
        lines[1].startswith("deaf: preempted, no save confirmed") and \
        lines[2].startswith("good: preempted, saved at step "), lines
    assert run("preempt", "all")[:2] == (0, "preempt: no job was running\n")
    code, out, _ = run("start", "good", "--json")
    res = json.loads(out)
    assert code == 0 and res["schema"] == 1 and res["verb"] == "start"
    assert [(o["job"], o["ok"], o["outcome"]) for o in res["results"]] == [("good", True, "started")]
    daemon.wait_ready("good", starts=2)
    code, out, _ = run("restart", "good", "--json")
    o = json.loads(out)["results"][0]
    assert code == 0 and (o["outcome"], o["saved"]) == ("restarted", True) and o["pid"], o
    code, out, _ = run("stop", "good", "nosuch", "--json")
    res = json.loads(out)["results"]
    assert code == 4 and [r["outcome"] for r in res] == ["stopped", "no-such-job"]
    assert set(res[0]) == set(res[1])                        # one shape, whatever happened
