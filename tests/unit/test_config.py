"""Job YAML and daemon config: the strict loader, validation, FILE:LINE errors."""

from __future__ import annotations

import grp
import os
import re
import signal
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainsup.config import yaml as config  # the reader: the fixture swaps its parser
from trainsup.config.files import load_daemon_config, load_job_file, load_jobs_dir, validate_files
from trainsup.config.values import crontab_trigger, parse_duration, parse_signal, parse_size
from trainsup.config.yaml import MAX_ERRORS, ConfigError
from trainsup.spec import (
    BackoffSpec,
    CheckpointSpec,
    DaemonSpec,
    EmergencySaveSpec,
    HangSpec,
    InvalidJob,
    JobSpec,
    MemorySpec,
    PreemptionSpec,
    RestartSpec,
    ScheduleSpec,
)

CORPUS = Path(__file__).parent / "yaml_corpus"
BAD = CORPUS / "bad"
GOOD = CORPUS / "good"
# FILE:LINE: KEY: message, all on one line.
ERROR_LINE = re.compile(r"(?P<line>\d+): (?P<key>\S(?:[^:\n]|:(?! ))*): (?P<msg>[^\n]+)")


def assert_error_format(error: str, path: Path) -> None:
    assert "\n" not in error, error
    assert error.startswith(f"{path}:"), error
    assert ERROR_LINE.fullmatch(error[len(f"{path}:"):]), error


def errors_of(path: Path, is_root: bool = False) -> list[str]:
    job = load_job_file(path, is_root=is_root)
    assert isinstance(job, InvalidJob), f"{path} should be invalid"
    for error in job.errors:
        assert_error_format(error, path)
    return list(job.errors)


# ------------------------------------------------------------------ bad corpus

BAD_EXPECTED = {
    "typo_key.yaml": [
        "5: checkpoint.keep_lst: unknown key; did you mean 'keep_last'?",
        "6: resart: unknown key; did you mean 'restart'?",
    ],
    "wrong_type.yaml": [
        '3: autostart: must be true or false, got "yes"',
        "6: checkpoint.keep_last: must be an integer >= 1, got true",     # bool is not an int
        '8: restart.backoff.factor: must be a number in [1, 10], got "fast"',
    ],
    "alias_bomb.yaml": ["3: a: anchors (&a) are not allowed"],
    "alias.yaml": ["2: command: aliases (*cmd) are not allowed"],
    "duplicate_key.yaml": ["5: restart.policy: duplicate key (first set on line 4)"],
    "empty.yaml": ["1: (file): the file is empty"],
    "python_tag.yaml": ["2: command: tags (!!python/object/apply:os.system) are not allowed"],
    "custom_tag.yaml": ["3: stop_timeout: tags (!seconds) are not allowed"],
    "bad_duration.yaml": [
        '3: stop_timeout: not a duration (use e.g. 90, "90s", "5m", "1h30m", "250ms"), '
        'got "10 seconds"',
        '4: restart.window: not a duration (use e.g. 90, "90s", "5m", "1h30m", "250ms"), '
        'got "-5m"',
    ],
    "bad_size.yaml": [
        '4: memory.limit: not a size (use e.g. 1048576, "500MB", "10GiB"), got "16 gigs"',
        '5: checkpoint.quota: a size must be a whole number of bytes, got "1.5B"',
    ],
    "bad_signal.yaml": [
        '4: emergency_save.signal: not a signal name or number (e.g. SIGUSR1), got "SIGBOGUS"',
    ],
    "kill_signal.yaml": [
        "3: emergency_save.signal: SIGKILL cannot be caught, so it cannot ask for a save",
    ],
    "not_mapping.yaml": ["1: (file): the top level must be a mapping of settings, got a list"],
    "two_documents.yaml": ["3: (file): more than one YAML document; one job per file"],
    "syntax.yaml": [
        "3: (yaml): did not find expected ',' or ']' (while parsing a flow sequence)",
    ],
    "missing_required.yaml": [
        "1: name: must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or "
        'digit, got "has spaces"',
        "1: command: required key is missing",
        "2: env.DEBUG: must be a string, got true (quote it if you mean the text)",
        "2: env.TRAINSUP_JOB: TRAINSUP_* variables are set by the daemon",
    ],
    "empty_command.yaml": [
        "2: command: must name a program to run, got an empty command",
        "3: memory.save_at: must be a number in (0, 1], got 1.5",
        "4: restart.backoff.max: must be >= initial (600s), got 60s",
    ],
}


def test_corpus_is_fully_covered():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(
        [*BAD_EXPECTED, "bad_cron.yaml"])


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_parser(request, monkeypatch):
    """The C parser is used when pyyaml was built with it; the fallback must agree."""
    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.skip("pyyaml built without libyaml")
    else:
        monkeypatch.setattr(config, "_Parser", yaml.SafeLoader)
    return request.param


@pytest.mark.parametrize("name", sorted(BAD_EXPECTED))
def test_bad_yaml_gives_exact_errors(name, yaml_parser):
    path = BAD / name
    expected = [f"{path}:{line}" for line in BAD_EXPECTED[name]]
    if name == "syntax.yaml" and yaml_parser == "pure-python":
        # the two parsers word syntax errors differently; the place is the same
        expected = [f"{path}:3: (yaml): expected ',' or ']', but got ':' "
                    "(while parsing a flow sequence)"]
    assert errors_of(path) == expected


def test_bad_cron_names_the_field_apscheduler_refused():
    path = BAD / "bad_cron.yaml"
    first, second = errors_of(path)
    # The reason in parentheses is APScheduler's own wording; the frame around it is ours.
    assert re.fullmatch(
        rf"{re.escape(str(path))}:4: schedule.checkpoint_cron: not a valid cron expression "
        r"\(.*25.*\), got \"0 25 \* \* \*\"", first)
    assert second == (f"{path}:5: schedule.preempt_cron: not a valid cron expression "
                      '(wrong number of fields; got 2, expected 5), got "every day"')


def test_invalid_job_is_named_by_its_name_or_else_the_file_stem():
    assert load_job_file(BAD / "wrong_type.yaml", is_root=False).name == "wrong-type"
    assert load_job_file(BAD / "missing_required.yaml", is_root=False).name == "missing_required"
    assert load_job_file(BAD / "alias_bomb.yaml", is_root=False).name == "alias_bomb"


def test_billion_laughs_is_refused_fast_and_small():
    path = BAD / "alias_bomb.yaml"
    # Expanded, this document is 10^9 strings; refusing at the first anchor keeps it tiny.
    tracemalloc.start()
    started = time.perf_counter()
    job = load_job_file(path, is_root=False)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(job, InvalidJob)
    assert elapsed < 0.1, elapsed
    assert peak < 2 << 20, peak


def test_file_over_one_mib_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: big\ncommand: [x]\n#" + "x" * (1 << 20) + "\n")
    assert errors_of(path) == [f"{path}:1: (file): file is larger than 1048576 bytes (1 MiB)"]


def test_file_of_exactly_one_mib_is_read(tmp_path):
    path = tmp_path / "edge.yaml"
    head = "name: edge\ncommand: [x]\n#"
    path.write_text(head + "x" * ((1 << 20) - len(head) - 1) + "\n")
    assert path.stat().st_size == 1 << 20
    assert isinstance(load_job_file(path, is_root=False), JobSpec)


def test_utf8_bom_is_accepted_and_offsets_count_it(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: b\ncommand: [x]\n")
    assert load_job_file(path, is_root=False).name == "b"
    path.write_bytes(b"\xef\xbb\xbfname: b\n\xff\n")
    assert errors_of(path) == [f"{path}:2: (file): not valid UTF-8 (byte 0xff at offset 11)"]


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\ncommand: [x]\nenv: {A: \"caf\xe9\"}\n")
    assert errors_of(path) == [f"{path}:3: (file): not valid UTF-8 (byte 0xe9 at offset 34)"]


def test_control_character_names_its_line(tmp_path, yaml_parser):
    path = tmp_path / "ctl.yaml"
    path.write_text("name: ééééé\ncommand: [x]\nenv: {A: \"\x01\"}\n")
    assert errors_of(path) == [
        f"{path}:3: (yaml): character U+0001 is not allowed in YAML"]


def test_comment_only_file_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing yet\n")
    assert errors_of(path) == [f"{path}:1: (file): the file is empty"]


def test_unreadable_things_become_invalid_jobs(tmp_path):
    dangling = tmp_path / "gone.yaml"
    dangling.symlink_to(tmp_path / "nowhere.yaml")
    assert errors_of(dangling) == [f"{dangling}:1: (file): cannot open: No such file or directory"]
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)                                   # must not block waiting for a writer
    assert errors_of(fifo) == [f"{fifo}:1: (file): not a regular file"]


def test_problems_are_capped_per_file(tmp_path):
    path = tmp_path / "typos.yaml"
    path.write_text("name: t\ncommand: [x]\n" + "".join(f"k{i}: 1\n" for i in range(100)))
    errors = errors_of(path)
    assert len(errors) == MAX_ERRORS
    assert errors[-1] == f"{path}:31: (file): {100 - MAX_ERRORS + 1} more problems not shown"


def test_out_of_range_values(tmp_path):
    path = tmp_path / "range.yaml"
    path.write_text("name: r\ncommand: [x]\ncheckpoint: {dir: c, keep_last: 0}\n"
                    "restart: {backoff: {factor: 0.5}}\nmemory: {interval: 0}\n")
    assert errors_of(path) == [
        f"{path}:3: checkpoint.keep_last: must be an integer >= 1, got 0",
        f"{path}:4: restart.backoff.factor: must be a number in [1, 10], got 0.5",
        f"{path}:5: memory.interval: must be a duration > 0, got 0",
    ]


def test_keys_are_taken_as_written_not_as_yaml11_booleans(tmp_path):
    path = tmp_path / "norway.yaml"
    path.write_text("name: n\ncommand: [x]\nenv: {N: 'no', ON: '1'}\n")
    assert load_job_file(path, is_root=False).env == (("N", "no"), ("ON", "1"))


# ------------------------------------------------------------------ good corpus

def test_spec_example_parses_with_every_value(yaml_parser):
    job = load_job_file(GOOD / "spec_example.yaml", is_root=False)
    assert job == JobSpec(
        name="mlp-demo",
        command=("python", "train.py", "--steps", "2000"),
        workdir=GOOD.absolute(),
        source=(GOOD / "spec_example.yaml").absolute(),
        env=(("OMP_NUM_THREADS", "1"),),
        user=None, group=None, autostart=True, stop_timeout=10.0,
        checkpoint=CheckpointSpec(dir=GOOD.absolute() / "ckpt", format="auto", keep_last=3,
                                  keep_best=1, metric=None, mode="min", keep_every=0,
                                  quota=None, resume_args=()),
        restart=RestartSpec(policy="on-failure", max_restarts=10, window=3600.0,
                            backoff=BackoffSpec(initial=1.0, max=300.0, factor=2.0),
                            max_restarts_without_progress=5),
        emergency_save=EmergencySaveSpec(signal="SIGUSR1", grace=120.0),
        memory=MemorySpec(limit=None, save_at=0.9, min_available=None, action="save",
                          interval=1.0),
        hang=HangSpec(timeout=None),
        schedule=ScheduleSpec(checkpoint_every=None, checkpoint_cron=None, preempt_cron=None),
    )


def test_every_key_with_non_default_values():
    job = load_job_file(GOOD / "everything.yaml", is_root=False)
    assert job == JobSpec(
        name="big-run",
        # numbers in a command line stay exactly as written ("0.10", not "0.1")
        command=("torchrun", "--nproc-per-node", "2", "train.py", "--lr", "0.10"),
        workdir=GOOD.absolute() / "run",
        source=(GOOD / "everything.yaml").absolute(),
        env=(("OMP_NUM_THREADS", "4"), ("WANDB_MODE", "offline"), ("SCALE", "1.50")),
        autostart=False,
        stop_timeout=90.0,
        checkpoint=CheckpointSpec(dir=Path("/tmp/ckpts/big-run"), format="torch", keep_last=5,
                                  keep_best=2, metric="val_loss", mode="max", keep_every=1000,
                                  quota=1_500_000_000, resume_args=("--resume", "{checkpoint}")),
        restart=RestartSpec(policy="always", max_restarts=0, window=7200.0,
                            backoff=BackoffSpec(initial=0.25, max=600.0, factor=3.0),
                            max_restarts_without_progress=2),
        emergency_save=EmergencySaveSpec(signal="SIGUSR2", grace=300.0),
        memory=MemorySpec(limit=16 << 30, save_at=1.0, min_available=2048 << 20,
                          action="stop", interval=0.5),
        hang=HangSpec(timeout=3600.0),
        schedule=ScheduleSpec(checkpoint_every=1800.0, checkpoint_cron="0 * * * *",
                              preempt_cron="0 2 * * 1-5"),
    )


def test_command_string_is_split_like_a_shell_without_one():
    job = load_job_file(GOOD / "minimal.yaml", is_root=False)
    assert job.command == ("python", "-u", "train model.py", "--lr", "0.10")
    assert job.workdir == GOOD.absolute() and job.checkpoint is None


def test_relative_paths(tmp_path):
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "p.yaml"
    path.write_text("name: p\ncommand: [x]\nworkdir: ../work\ncheckpoint: {dir: out/ckpt}\n")
    job = load_job_file(path, is_root=False)
    assert job.workdir == tmp_path / "work"
    assert job.checkpoint.dir == tmp_path / "work" / "out" / "ckpt"


def test_unclosed_quote_in_command_string(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("name: q\ncommand: python 'train.py\n")
    assert errors_of(path) == [f"{path}:2: command: cannot split into words: No closing quotation"]


# ------------------------------------------------------------------ users and groups

def test_user_and_group_are_looked_up_when_root(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text("name: u\ncommand: [x]\nuser: root\ngroup: root\n")
    job = load_job_file(path, is_root=True)
    assert (job.user, job.group) == ("root", "root")
    path.write_text("name: u\ncommand: [x]\nuser: no-such-user-ts\ngroup: no-such-group-ts\n")
    assert errors_of(path, is_root=True) == [
        f"{path}:3: user: no such user 'no-such-user-ts'",
        f"{path}:4: group: no such group 'no-such-group-ts'",
    ]


def test_user_needs_a_root_daemon(tmp_path):
    other = next(p.pw_name for p in __import__("pwd").getpwall() if p.pw_uid != os.getuid())
    path = tmp_path / "u.yaml"
    path.write_text(f"name: u\ncommand: [x]\nuser: {other}\n")
    assert errors_of(path, is_root=False) == [
        f"{path}:3: user: runs the job as {other!r}, but the daemon is not running as root "
        "and cannot switch users"]
    # Naming the daemon's own user switches nothing, so it is fine without root.
    me = __import__("pwd").getpwuid(os.getuid()).pw_name
    path.write_text(f"name: u\ncommand: [x]\nuser: {me}\n")
    assert load_job_file(path, is_root=False).user == me


# ------------------------------------------------------------------ jobs dir

def test_jobs_dir_reads_yaml_files_sorted_and_skips_the_rest(tmp_path):
    (tmp_path / "b.yml").write_text("name: b\ncommand: [x]\n")
    (tmp_path / "a.yaml").write_text("name: a\ncommand: [x]\n")
    (tmp_path / ".hidden.yaml").write_text("name: hidden\ncommand: [x]\n")
    (tmp_path / "notes.txt").write_text("name: notes\n")
    (tmp_path / "a.yaml~").write_text("name: backup\ncommand: [x]\n")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "z.yaml").write_text("name: [z]\n")
    jobs, invalid = load_jobs_dir(tmp_path, is_root=False)
    assert [j.name for j in jobs] == ["a", "b"]
    assert [j.name for j in invalid] == ["z"]


def test_missing_jobs_dir_is_empty(tmp_path):
    assert load_jobs_dir(tmp_path / "absent", is_root=False) == ([], [])


def test_duplicate_job_name_makes_the_later_file_invalid():
    jobs, invalid = load_jobs_dir(CORPUS / "dupname", is_root=False)
    a, b = CORPUS / "dupname" / "a.yaml", CORPUS / "dupname" / "b.yaml"
    assert [j.source for j in jobs] == [a.absolute()]
    assert invalid == [InvalidJob(name="same", source=b.absolute(), errors=(
        f"{b}:2: name: job name 'same' is already used by {a}:1",))]


def test_validate_files_counts_duplicates_across_files():
    a, b = CORPUS / "dupname" / "a.yaml", CORPUS / "dupname" / "b.yaml"
    typo = BAD / "typo_key.yaml"
    errors = validate_files([a, typo, b], is_root=False)
    assert errors == [f"{typo}:{line}" for line in BAD_EXPECTED["typo_key.yaml"]] + [
        f"{b}:2: name: job name 'same' is already used by {a}:1"]
    assert validate_files([a], is_root=False) == []


# ------------------------------------------------------------------ value tables

@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), (1.5, 1.5), (0, 0.0), ("90", 90.0), ("90s", 90.0), ("5m", 300.0),
    ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25), ("2d", 172800.0), (" 10s ", 10.0),
    ("1h0m30s", 3630.0),
])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    -1, "-5s", "5 m", "5x", "m", "", "1.s", ".5s", "5M", "1h 30m", True, None, [5],
    float("nan"), float("inf"), "1e3s",
])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value, size", [
    (1048576, 1048576), (0, 0), (2.0, 2), ("1048576", 1048576), ("500MB", 500 * 10**6),
    ("10GiB", 10 * 2**30), ("1.5GB", 1_500_000_000), ("1K", 1000), ("1KB", 1000),
    ("1KiB", 1024), ("2M", 2 * 10**6), ("2MiB", 2 * 2**20), ("3G", 3 * 10**9),
    ("1T", 10**12), ("1TiB", 2**40), ("16 GiB", 16 * 2**30), ("1.5KiB", 1536), ("7B", 7),
    ("500mb", 500 * 10**6),
])
def test_sizes(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [
    -1, "-1MB", "1.5", "1.1B", "10 parsecs", "MB", "", "1PB", "1iB", 1.5, True, None,
    float("inf"),
])
def test_bad_sizes(value):
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize("value, name", [
    ("SIGUSR1", "SIGUSR1"), ("USR1", "SIGUSR1"), ("usr2", "SIGUSR2"),
    (int(signal.SIGUSR1), "SIGUSR1"), ("SIGTERM", "SIGTERM"),
])
def test_signals(value, name):
    assert parse_signal(value) == name


@pytest.mark.parametrize("value", ["SIGBOGUS", "", 0, 999, True, 1.0, None])
def test_bad_signals(value):
    with pytest.raises(ValueError):
        parse_signal(value)


@pytest.mark.parametrize("expression, weekday", [
    ("0 2 * * 1", "Monday"), ("0 2 * * 0", "Sunday"), ("0 2 * * 7", "Sunday"),
    ("0 2 * * sat", "Saturday"), ("0 2 * * 6-7", "Saturday"),
])
def test_cron_weekdays_mean_what_crontab_means(expression, weekday):
    # 2024-01-02 is a Tuesday; APScheduler 3 alone would read "1" as Tuesday.
    fire = crontab_trigger(expression).get_next_fire_time(
        None, datetime(2024, 1, 2, 3, tzinfo=timezone.utc))
    assert fire.strftime("%A") == weekday


# ------------------------------------------------------------------ daemon config

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_daemon_root_defaults():
    try:
        grp.getgrnam("trainsup")
        group = "trainsup"
    except KeyError:
        group = None
    assert load_daemon_config(None, {}, is_root=True, env={}) == DaemonSpec(
        jobs_dir=Path("/etc/trainsup/jobs.d"), state_dir=Path("/var/lib/trainsup"),
        socket=Path("/run/trainsup/trainsup.sock"), log_dir=Path("/var/log/trainsup"),
        socket_group=group)


def test_daemon_non_root_defaults_follow_xdg():
    env = {"HOME": "/home/u", "XDG_CONFIG_HOME": "/cfg", "XDG_STATE_HOME": "/st",
           "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert load_daemon_config(None, {}, is_root=False, env=env) == DaemonSpec(
        jobs_dir=Path("/cfg/trainsup/jobs.d"), state_dir=Path("/st/trainsup"),
        socket=Path("/run/user/1000/trainsup.sock"), log_dir=Path("/st/trainsup/logs"))
    # Unset (or relative, which the XDG spec says to ignore): the home-based fallbacks.
    bare = load_daemon_config(None, {}, is_root=False,
                              env={"HOME": "/home/u", "XDG_RUNTIME_DIR": "rel"})
    assert bare == DaemonSpec(
        jobs_dir=Path("/home/u/.config/trainsup/jobs.d"),
        state_dir=Path("/home/u/.local/state/trainsup"),
        socket=Path("/home/u/.local/state/trainsup/trainsup.sock"),
        log_dir=Path("/home/u/.local/state/trainsup/logs"))


def test_daemon_precedence_flags_over_file_over_defaults(tmp_path):
    config = write(tmp_path / "trainsup.yaml",
                   "jobs_dir: jobs\nstate_dir: /srv/state\nsocket: /srv/s.sock\n"
                   "disk_quota: 100GB\npass_env: [CUDA_VISIBLE_DEVICES, HF_HOME]\n"
                   "log_max_bytes: 10MiB\nlog_backups: 5\n"
                   "preemption: {provider: aws, poll: 2s, trigger_file: preempt-now,"
                   " metadata_url: 'http://127.0.0.1:9/'}\n")
    spec = load_daemon_config(config, {"state_dir": "/flag/state", "socket": None},
                              is_root=False, env={"HOME": "/home/u"})
    assert spec == DaemonSpec(
        jobs_dir=tmp_path / "jobs",                       # file, relative to the file
        state_dir=Path("/flag/state"),                    # flag beats file
        socket=Path("/srv/s.sock"),                       # None flag: file still wins
        log_dir=Path("/flag/state/logs"),                 # default, derived from the flag
        disk_quota=100 * 10**9, pass_env=("CUDA_VISIBLE_DEVICES", "HF_HOME"),
        log_max_bytes=10 << 20, log_backups=5,
        preemption=PreemptionSpec(trigger_file=tmp_path / "preempt-now", provider="aws",
                                  poll=2.0, metadata_url="http://127.0.0.1:9"))


def test_daemon_flag_paths_are_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_daemon_config(None, {"jobs_dir": Path("j"), "log_dir": "l"}, is_root=True)
    assert (spec.jobs_dir, spec.log_dir) == (tmp_path / "j", tmp_path / "l")


def test_daemon_null_path_means_default_and_null_group_means_none(tmp_path):
    config = write(tmp_path / "c.yaml", "jobs_dir: null\nsocket_group: null\n")
    spec = load_daemon_config(config, {}, is_root=True, env={})
    assert spec.jobs_dir == Path("/etc/trainsup/jobs.d") and spec.socket_group is None


def test_bad_daemon_config_lists_every_problem(tmp_path):
    config = write(tmp_path / "c.yaml",
                   "state_dir: 5\nsocket_grup: x\nsocket_group: no-such-group-ts\n"
                   "pass_env: [OK, 'not ok']\npreemption: {provider: ibm, poll: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_daemon_config(config, {"disk_quota": "lots"}, is_root=False, env={})
    assert caught.value.errors == [
        f"{config}:1: state_dir: must be a non-empty string, got 5",
        f"{config}:2: socket_grup: unknown key; did you mean 'socket_group'?",
        f"{config}:3: socket_group: no such group 'no-such-group-ts'",
        f'{config}:4: pass_env[1]: must be a variable name like OMP_NUM_THREADS, got "not ok"',
        f'{config}:5: preemption.provider: must be one of aws, gcp, azure, got "ibm"',
        f"{config}:5: preemption.poll: must be a duration > 0, got 0",
        'command line: --disk-quota: not a size (use e.g. 1048576, "500MB", "10GiB"), '
        'got "lots"',
    ]
    assert str(caught.value) == "\n".join(caught.value.errors)


def test_daemon_config_missing_file_and_bomb(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_daemon_config(tmp_path / "nope.yaml", {}, is_root=True)
    assert caught.value.errors == [
        f"{tmp_path / 'nope.yaml'}:1: (file): cannot open: No such file or directory"]
    with pytest.raises(ConfigError):
        load_daemon_config(BAD / "alias_bomb.yaml", {}, is_root=True)


def test_daemon_socket_path_too_long_for_af_unix(tmp_path):
    with pytest.raises(ConfigError, match="at most 107"):
        load_daemon_config(None, {"state_dir": "/" + "d" * 120}, is_root=False,
                           env={"HOME": "/home/u"})


def test_daemon_unknown_override_is_a_programming_error():
    with pytest.raises(ValueError):
        load_daemon_config(None, {"jobsdir": "x"}, is_root=True)


# ------------------------------------------------------------------ fuzz

KEYS = ["name", "command", "workdir", "env", "user", "group", "autostart", "stop_timeout",
        "checkpoint", "restart", "emergency_save", "memory", "hang", "schedule", "dir",
        "format", "keep_last", "quota", "resume_args", "policy", "backoff", "factor",
        "signal", "grace", "limit", "save_at", "timeout", "checkpoint_cron", "OMP", "x y"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["90s", "1h30m", "10GiB", "SIGUSR1", "KILL",
                                           "0 * * * *", "ckpt", "on-failure", "-1", ""]))
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children,
                        max_size=5)),
    max_leaves=25)
yamlish = st.lists(
    st.one_of(st.sampled_from(list(":-[]{},&*!|>'\"#%@`?\n \t\\") + [
        "name: ", "command: ", "checkpoint:\n  ", "---\n", "!!python/", "&a ", "*a",
        "  - ", "\x00", "\ufeff", "é", "1h", "GiB", "true", "null"]), st.characters()),
    max_size=60).map("".join)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    # module scope: hypothesis reruns the body many times inside one function-scoped call
    return tmp_path_factory.mktemp("fuzz")


def check_never_raises(path: Path) -> None:
    job = load_job_file(path, is_root=False)
    assert isinstance(job, (JobSpec, InvalidJob))
    if isinstance(job, InvalidJob):
        assert job.errors
        for error in job.errors:
            assert_error_format(error, path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yamlish)
def test_fuzz_yamlish_text(fuzz_dir, text):
    path = fuzz_dir / "text.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_never_raises(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), structures, max_size=8), st.booleans())
def test_fuzz_nested_structures(fuzz_dir, document, flow):
    path = fuzz_dir / "struct.yaml"
    path.write_text(yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True))
    check_never_raises(path)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes(fuzz_dir, data):
    path = fuzz_dir / "bytes.yaml"
    path.write_bytes(data)
    check_never_raises(path)


# -- daemon config discovery and the example config (issue 15) -------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "trainsup.yaml.example"


def test_example_daemon_config_sets_every_key_to_its_default():
    from trainsup.config.schema import DAEMON
    assert load_daemon_config(EXAMPLE, {}, is_root=True, env={}) == load_daemon_config(None, {}, is_root=True, env={})
    text = EXAMPLE.read_text()
    for key in DAEMON.keys:
        assert f"\n{key}:" in text, f"the example config does not show {key}"


def test_config_discovery_order(tmp_path):
    from trainsup.config.files import discover_config
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    user_file = tmp_path / "cfg" / "trainsup" / "trainsup.yaml"
    assert discover_config(None, is_root=False, env=env) is None           # nothing there: no file
    user_file.parent.mkdir(parents=True)
    user_file.write_text("disk_quota: 1GB\n")
    assert discover_config(None, is_root=False, env=env) == user_file
    explicit = tmp_path / "other.yaml"
    assert discover_config(explicit, is_root=False, env=env) == explicit   # --config wins, even if absent
    unit_dir = tmp_path / "unit-cfg"
    unit_dir.mkdir()
    (unit_dir / "trainsup.yaml").write_text("")
    assert discover_config(None, is_root=False, env={**env, "CONFIGURATION_DIRECTORY": str(unit_dir)}) \
        == unit_dir / "trainsup.yaml"
    # root reads /etc/trainsup/trainsup.yaml only (not a user's XDG file)
    assert discover_config(None, is_root=True, env=env) in (None, Path("/etc/trainsup/trainsup.yaml"))


def test_log_dir_follows_state_dir_when_only_state_dir_is_set(tmp_path):
    root = load_daemon_config(None, {"state_dir": tmp_path / "s"}, is_root=True, env={})
    assert root.log_dir == tmp_path / "s" / "logs"
    both = load_daemon_config(None, {"state_dir": tmp_path / "s", "log_dir": tmp_path / "l"}, is_root=True, env={})
    assert both.log_dir == tmp_path / "l"


def test_systemd_directories_are_the_defaults():
    env = {"CONFIGURATION_DIRECTORY": "/etc/trainsup", "STATE_DIRECTORY": "/var/lib/t",
           "RUNTIME_DIRECTORY": "/run/t", "LOGS_DIRECTORY": "/var/log/t"}
    spec = load_daemon_config(None, {}, is_root=True, env=env)
    assert (spec.jobs_dir, spec.state_dir, spec.socket, spec.log_dir) == (
        Path("/etc/trainsup/jobs.d"), Path("/var/lib/t"), Path("/run/t/trainsup.sock"), Path("/var/log/t"))


def test_metrics_and_hooks_keys(tmp_path):
    from trainsup.spec import HookSpec, MetricsSpec
    config = write(tmp_path / "c.yaml", "metrics: {listen: '9184'}\n"
                   "hooks: [{command: [/bin/true], on: [crash], timeout: 3s}]\n")
    spec = load_daemon_config(config, {}, is_root=True, env={})
    assert spec.metrics == MetricsSpec(listen="127.0.0.1:9184")
    assert spec.hooks == (HookSpec(command=("/bin/true",), on=("crash",), timeout=3.0),)
    bad = write(tmp_path / "b.yaml", "metrics: {listen: 'localhost:http'}\nhooks: [{on: [oops]}]\n")
    with pytest.raises(ConfigError) as e:
        load_daemon_config(bad, {}, is_root=True, env={})
    assert [line.split(": ")[0].split(":", 1)[1] + ":" + line.split(": ")[1] for line in e.value.errors] == [
        "1:metrics.listen", "2:hooks[0].command", "2:hooks[0].on"], e.value.errors


def test_config_none_and_trainsup_config_choose_no_file_or_another(tmp_path):
    """Issue 24: there was no way to say "no config" (`--config /dev/null` and an empty file
    were refused), so every test daemon read the machine's /etc/trainsup/trainsup.yaml."""
    from trainsup.config.files import choose_config
    home = tmp_path / "home"
    conventional = home / ".config" / "trainsup" / "trainsup.yaml"
    conventional.parent.mkdir(parents=True)
    conventional.write_text("hooks: []\n")
    env = {"HOME": str(home)}
    assert choose_config(None, is_root=False, env=env) == (conventional, f"{conventional} (found at its default place)")
    assert choose_config("none", is_root=False, env=env) == (None, "no config file (--config none)")
    assert choose_config(None, is_root=False, env={**env, "TRAINSUP_CONFIG": "none"})[0] is None
    other = tmp_path / "other.yaml"
    assert choose_config(None, is_root=False, env={**env, "TRAINSUP_CONFIG": str(other)})[0] == other
    assert choose_config(str(conventional), is_root=False, env={**env, "TRAINSUP_CONFIG": "none"})[0] == conventional


def test_validate_daemon_config_checks_the_daemon_file_not_as_a_job(tmp_path):
    """Issue 24: `validate` on the daemon config reported 13 job-file errors."""
    import subprocess
    import sys
    good = tmp_path / "trainsup.yaml"
    good.write_text("metrics: {listen: 127.0.0.1:9184, required: false}\nhooks: []\ndisk_quota: 10GiB\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics:\n  listen: nowhere\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "trainsup", "validate", *args], capture_output=True,
                              text=True, timeout=60)
    r = run("--daemon-config", str(good))
    assert r.returncode == 0 and "daemon config OK" in r.stdout, r.stderr
    r = run("--daemon-config", str(bad))
    assert r.returncode == 1 and r.stderr.strip() == \
        f'{bad}:2: metrics.listen: must be HOST:PORT such as 127.0.0.1:9184, got "nowhere"', r.stderr
    r = run("--daemon-config")              # TRAINSUP_CONFIG=none (conftest): nothing to check
    assert r.returncode == 0 and "no config file" in r.stdout
