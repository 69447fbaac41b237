"""Issue 11 cases 3, 4, 9 and the NUL manifest name: which dirs and names a job may claim."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainsup import config
from trainsup.checkpoint import write_checkpoint
from trainsup.checkpoint.formats import managed_format
from trainsup.checkpoint.index import scan
from trainsup.checkpoint.naming import step_of


def _job(d: Path, name: str, ckdir: str) -> Path:
    p = d / f"{name}.yaml"
    p.write_text(f"name: {name}\ncommand: [/bin/true]\nworkdir: {d}\ncheckpoint:\n  keep_last: 1\n  dir: {ckdir}\n")
    return p


def test_state_dir_jobs_dir_home_root_symlink_refused_with_file_line(tmp_path, monkeypatch):
    jobs, state = tmp_path / "jobs", tmp_path / "state"
    jobs.mkdir()
    state.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    for name, d in (("root", "/"), ("home", str(tmp_path / "home")), ("state", str(state)),
                    ("instate", str(state / "x")), ("parentofjobs", str(tmp_path)),
                    ("viasymlink", str(tmp_path / "link" / "ck"))):
        _job(jobs, name, d)
    ok, bad = config.load_jobs_dir(jobs, is_root=True, state_dir=state)
    errs = {b.name: b.errors for b in bad}
    assert ok == [] and set(errs) == {"root", "home", "state", "instate", "parentofjobs", "viasymlink"}
    for name, why in (("root", "`/` cannot be"), ("home", "is a home dir"), ("state", "state dir"),
                      ("instate", "inside the daemon's state dir"), ("parentofjobs", "contains the daemon's"),
                      ("viasymlink", "is a symlink to")):
        (line,) = errs[name]
        assert line.startswith(f"{jobs / name}.yaml:6: checkpoint.dir: ") and why in line, line


def test_shared_and_nested_dirs_refused_pointing_at_the_first(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    _job(jobs, "a", str(tmp_path / "ck"))
    _job(jobs, "b", str(tmp_path / "ck"))
    _job(jobs, "c", str(tmp_path / "ck" / "sub"))
    _job(jobs, "d", str(tmp_path / "other"))
    ok, bad = config.load_jobs_dir(jobs, is_root=True)
    assert [j.name for j in ok] == ["a", "d"]
    errs = {b.name: b.errors[0] for b in bad}
    assert f"is also job 'a''s checkpoint dir ({jobs / 'a.yaml'}:6)" in errs["b"]
    assert "is inside job 'a''s checkpoint dir" in errs["c"]


def test_names_fullmatch_and_step_words():
    assert managed_format("step-00000300", True) == "trainsup"
    assert managed_format("step-00000300\n", True) is None            # case 9
    assert managed_format("resnet50.pt", False) is None                # case 3
    assert managed_format("pretrained_backbone.pt", False) is None
    assert managed_format("epoch=3-step=400.ckpt", False) == "torch" and step_of("epoch=3-step=400.ckpt") == 400
    assert managed_format("last.ckpt", False) == "torch" and step_of("last.ckpt") is None


def test_trailing_newline_dir_listed_unmanaged(tmp_path):
    write_checkpoint(tmp_path, 300, {"x": b"1"})
    os.rename(tmp_path / "step-00000300", tmp_path / "step-00000300\n")
    (i,) = scan(tmp_path)
    assert not i.managed and i.step is None and not i.valid


def test_nul_in_a_manifest_file_name_is_an_invalid_verdict(tmp_path):
    p = write_checkpoint(tmp_path, 1, {"x": b"1"})
    m = json.loads((p / "MANIFEST.json").read_text())
    m["files"]["a\u0000b"] = dict(m["files"]["x"])
    (p / "MANIFEST.json").write_text(json.dumps(m))
    (i,) = scan(tmp_path)
    assert not i.valid and "NUL" in i.invalid_reason and "\n" not in i.invalid_reason


def test_cross_job_conflicts_name_the_first_claimant_as_a_pairwise_scan_would(tmp_path):
    """The check is linear in the jobs now (200 jobs cost a second of the daemon's start
    when every dir was compared with every other): on random nestings of dirs it refuses
    the same jobs with the same words, naming the same other job, as the pairwise scan."""
    import random
    from types import SimpleNamespace

    from trainsup.checkpoint.claims import cross_job_conflicts

    def pairwise(jobs):
        out, claimed = {}, []
        for j in jobs:
            d = Path(os.path.normpath(j.checkpoint.dir))
            why = None
            for od, o in claimed:
                if d == od:
                    why = ("also", o.name)
                elif od == d or d in od.parents:
                    why = ("contains", o.name)
                elif d in od.parents or od in d.parents:
                    why = ("inside", o.name)
                if why:
                    break
            if why:
                out[j.name] = why
            else:
                claimed.append((d, j))
        return out

    src = tmp_path / "job.yaml"
    src.write_text("name: x\n")
    parts = ["a", "b", "c"]
    for seed in range(200):
        rng = random.Random(seed)
        jobs = [SimpleNamespace(name=f"j{i}", source=src, checkpoint=SimpleNamespace(
                    dir=str(tmp_path.joinpath("r", *rng.choices(parts, k=rng.randint(1, 4))))))
                for i in range(rng.randint(2, 12))]
        got = cross_job_conflicts(jobs, env={})
        want = pairwise(jobs)
        assert set(got) == set(want), (seed, got, want)
        for name, (kind, other) in want.items():
            (line,) = got[name]
            assert f"{kind} job {other!r}'s" in line or (kind == "also" and f"also job {other!r}'s" in line), \
                (seed, line, kind, other)
