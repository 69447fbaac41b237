"""What a user of each framework reads off the disk to know which saves are complete
(shared by the TF, Paddle rotation and killed-mid-save tests). No daemon code is used:
these are the framework's own commit markers, read the way the framework reads them."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

# ------------------------------------------------------------ Hugging Face, Keras

def hf_complete(d: Path) -> dict[Path, int]:
    """{checkpoint-N: N} whose trainer_state.json (the Trainer writes it last) says step N."""
    out = {}
    for p in d.glob("checkpoint-*"):
        try:
            st = json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if re.fullmatch(r"checkpoint-\d+", p.name) and st.get("global_step") == int(p.name.split("-")[1]):
            out[p] = st["global_step"]
    return out


def keras_backup_complete(d: Path) -> dict[Path, int]:
    """{latest.weights.h5: step} of BackupAndRestore's backup, by its metadata (the marker)."""
    try:
        meta = json.loads((d / "training_metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    w = d / "latest.weights.h5"
    return {w: int(meta["step"])} if w.exists() else {}


# ----------------------------------------------------------------- TensorFlow

def tf_listed(d: Path) -> list[str]:
    """Names of the saves the `checkpoint` state file lists (TF's commit marker)."""
    try:
        text = (d / "checkpoint").read_text()
    except OSError:
        return []
    return [Path(n).name for n in re.findall(r'^all_model_checkpoint_paths:\s*"([^"]+)"', text, re.M)]


def tf_ckpts(d: Path) -> dict[Path, int]:
    """{ckpt-N prefix: N} of the committed CheckpointManager saves: listed, index and shard on disk."""
    out = {}
    for name in tf_listed(d):
        if (m := re.fullmatch(r"ckpt-(\d+)", name)) and (d / f"{name}.index").exists() \
                and list(d.glob(f"{name}.data-*")):
            out[d / name] = int(m.group(1))
    return out


# --------------------------------------------------------------------- Paddle

PADDLE_ITER = re.compile(r"^iter_epoch_(\d+)\.pdparams$")


def paddle_step(prefix: Path) -> int | None:
    """global_step of a complete PaddleOCR group (its .states pickle: the save's last file)."""
    try:
        with open(prefix.with_name(prefix.name + ".states"), "rb") as f:
            return int(pickle.load(f)["global_step"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError):
        return None


def paddle_numbered(d: Path) -> dict[Path, int]:
    """{iter_epoch_N prefix: global_step} of the complete numbered groups."""
    out = {}
    for n in os.listdir(d):
        if PADDLE_ITER.match(n):
            prefix = d / n[: -len(".pdparams")]
            if (s := paddle_step(prefix)) is not None:
                out[prefix] = s
    return out


def paddle_resume_point(d: Path) -> tuple[Path, int]:
    """The prefix Global.checkpoints gets: the newest group by step; `latest` only when it is
    newer than every iter_epoch_N (at the same step the numbered group is the checkpoint)."""
    numbered = max(paddle_numbered(d).items(), key=lambda kv: kv[1], default=None)
    latest = paddle_step(d / "latest")
    if latest is not None and (numbered is None or latest > numbered[1]):
        return d / "latest", latest
    assert numbered is not None, f"no complete Paddle group in {sorted(os.listdir(d))}"
    return numbered
