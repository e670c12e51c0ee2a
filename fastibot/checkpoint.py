"""Atomic checkpoints: write to a temporary file in the same folder, fsync, rename.

A crash mid-write leaves the previous checkpoints intact; readers never see a
half-written file. ``keep_last`` newest ``checkpoint_<step>.pt`` files are kept.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

_NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")


def atomic_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoints(folder) -> list:
    """(step, path) of the run folder's checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p.name) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder, step: int, state: dict, keep_last: int) -> Path:
    path = Path(folder) / f"checkpoint_{step:08d}.pt"
    atomic_save(state, path)
    for _, old in checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder) -> Optional[Path]:
    found = checkpoints(folder)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str) -> Path:
    """``--resume`` with a file, a run folder, or ``auto``/``latest`` (this run's folder)."""
    target = Path(output_dir) if resume in ("auto", "latest", "") else Path(resume)
    if target.is_dir():
        path = latest_checkpoint(target)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint_*.pt in {str(target)!r}")
        return path
    if not target.is_file():
        raise FileNotFoundError(f"--resume: {str(target)!r} is neither a checkpoint file nor a run folder")
    return target


def load_checkpoint(path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None
