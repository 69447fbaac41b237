"""One table of checkpoint formats (checkpoint/formats/FORMATS): config's choices and the
index derive from it, and every format in it has a checkpoint written by its real writer
that is valid, and one killed mid-write that is never offered for resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FRAMEWORK_FIXTURES, REPO
from trainsup.checkpoint import formats, write_checkpoint
from trainsup.checkpoint.index import latest_valid, scan
from trainsup.config import load_job_file
from trainsup.spec import InvalidJob

FIXTURES = FRAMEWORK_FIXTURES
LV = "lightning_logs/version_0/checkpoints/"

# format -> (tree with a good entry, that entry), (tree killed mid-write, the entry it cut)
FIXTURE_OF = {
    "torch": (("pytorch/good", "checkpoint_epoch3.pth"), ("pytorch/interrupted", "checkpoint_epoch3.pth")),
    "hf": (("hf_trainer/good", "checkpoint-6"), ("hf_trainer/interrupted", "checkpoint-6")),
    "paddle": (("paddle/good", "iter_epoch_3"), ("paddle/interrupted", "latest")),
    "tf": (("tensorflow/good", "ckpt-3"), ("tensorflow/interrupted", "ckpt-3")),
    "keras": (("keras/good", "ckpt_weights/epoch03.weights.h5"),
              ("keras/interrupted", "ckpt_weights/epoch03.weights.h5")),
    "lightning": (("lightning/good", LV + "epoch=2-step=12.ckpt"),
                  ("lightning/interrupted", LV + "epoch=2-step=12.ckpt")),
    "dcp": (("dcp/good", "step_8"), ("dcp/interrupted", "step_12")),
    "deepspeed": (("deepspeed/good", "global_step8"), ("deepspeed/interrupted", "global_step12")),
    "accelerate": (("accelerate/good", "checkpoints/checkpoint_1"),
                   ("accelerate/interrupted", "checkpoints/checkpoint_2")),
    "orbax": (("orbax/good", "8"), ("orbax/interrupted", "12.orbax-checkpoint-tmp")),
}


def test_every_format_in_the_table_is_selectable_and_has_its_hooks(tmp_path):
    assert formats.CHOICES == ("auto", *formats.FORMATS)
    for name in (*formats.CHOICES, "nosuch"):
        job = tmp_path / f"{name}.yaml"
        job.write_text(f"name: j\ncommand: [\"true\"]\nworkdir: {tmp_path}\ncheckpoint: {{dir: ck, format: {name}}}\n")
        spec = load_job_file(job, is_root=os.geteuid() == 0)
        if name == "nosuch":
            assert isinstance(spec, InvalidJob) and ", ".join(formats.NAMES) in spec.errors[0], spec
        else:
            assert spec.checkpoint.format == name, spec
    for name, m in formats.FORMATS.items():
        assert m.NAME == name and m.KIND in ("entry", "group"), name
        assert callable(m.check), name
        assert callable(m.claims if m.KIND == "entry" else m.recognise), name
    assert set(formats.ENTRY) | set(formats.GROUP) == set(formats.FORMATS)


def test_every_format_has_a_good_fixture_and_one_killed_mid_write():
    """Adding a format means adding its fixtures here (trainsup and safetensors make theirs
    below, from their real writers)."""
    assert set(FIXTURE_OF) | {"trainsup", "safetensors"} == set(formats.FORMATS)


def _copy(tree: str, tmp_path: Path) -> Path:
    dst = tmp_path / tree.replace("/", "_")
    shutil.copytree(FIXTURES / tree, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("fmt", sorted(FIXTURE_OF))
def test_good_fixture_is_valid_and_killed_one_is_never_offered(fmt, tmp_path):
    (good_tree, good), (bad_tree, bad) = FIXTURE_OF[fmt]
    for explicit in ("auto", fmt):
        infos = {i.name: i for i in scan(_copy(good_tree, tmp_path / explicit / "g"), explicit)}
        assert infos[good].valid and infos[good].format == fmt, infos.get(good)
        cut = scan(_copy(bad_tree, tmp_path / explicit / "b"), explicit)
        named = {i.name: i for i in cut}
        assert not named[bad].valid and named[bad].invalid_reason, named[bad]
        assert latest_valid(cut) is None or latest_valid(cut).name != bad


def test_trainsup_format_save_killed_mid_write_is_in_progress_never_valid(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, 1, {"w.bin": b"x" * 1000})
    code = ("import sys; from trainsup.checkpoint import write_checkpoint\n"
            "write_checkpoint(sys.argv[1], 2, {'w.bin': b'y' * 1000})")
    env = dict(os.environ, PYTHONPATH=str(REPO), TRAINSUP_TEST_KILL_AT="files-synced")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt)], env=env, timeout=60)
    assert r.returncode == -9
    infos = scan(ckpt, "trainsup")
    assert [i.step for i in infos if i.valid] == [1]
    assert [i.step for i in infos if i.in_progress] == [2]
    assert latest_valid(infos).step == 1


def test_safetensors_written_whole_is_valid_and_cut_short_is_not(tmp_path):
    src = _copy("hf_trainer/good", tmp_path) / "checkpoint-2" / "model.safetensors"
    d = tmp_path / "st"
    d.mkdir()
    shutil.copy(src, d / "model-100.safetensors")
    data = src.read_bytes()
    (d / "model-200.safetensors").write_bytes(data[: len(data) // 2])
    infos = {i.name: i for i in scan(d, "safetensors")}
    assert infos["model-100.safetensors"].valid and infos["model-100.safetensors"].step == 100
    assert not infos["model-200.safetensors"].valid
    assert latest_valid(list(infos.values())).name == "model-100.safetensors"
