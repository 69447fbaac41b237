"""A plain `torch.save` file: `*.pt`, `*.pth`, `*.ckpt` named like a save (`step_300.pt`,
`model-100.pt`, `epoch=3-step=400.ckpt`) or like the newest save (`last.ckpt`, `latest.pt`).
Valid when the zip is complete (readers/zip.py). Legacy (pre-1.6, non-zip) pickles are
invalid: proving one complete would mean walking several concatenated pickles and raw
storages, and torch has written zips since 2020."""

from __future__ import annotations

import os

from ..jobfile import open_entry_file
from ..naming import TORCH_ALIAS, TORCH_NUMBERED, TORCH_SEPARATED, step_of
from .common import Invalid, Verdict
from .readers.zip import check_torch_fd

NAME = "torch"
KIND = "entry"


def claims(name: str, is_dir: bool) -> bool:
    return not is_dir and any(rx.fullmatch(name) for rx in (TORCH_NUMBERED, TORCH_SEPARATED, TORCH_ALIAS))


def check_torch(path: str) -> Verdict:
    step = step_of(os.path.basename(path))
    try:
        fd, st = open_entry_file(path)
    except Invalid as e:
        return Verdict("torch", False, str(e), step)
    try:
        check_torch_fd(fd, st.st_size)
    except Invalid as e:
        return Verdict("torch", False, str(e), step)
    finally:
        os.close(fd)
    return Verdict("torch", True, None, step)


check = check_torch
