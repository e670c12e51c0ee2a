"""Checkpoints: atomic writes, a size and checksum record beside each file, loading that runs no code.

Writing: the state goes to a temporary file in the run folder (fsync, then rename), and its size and
SHA-256 go to ``checkpoint_<step>.pt.json`` just before the rename, so a visible checkpoint always has
its record and a crash mid-write leaves the earlier checkpoints intact. A checkpoint is *known good*
once the steps taken from it up to the next checkpoint were all finite (its record is updated then).
Until the run completes, rotation keeps the newest ``runtime.keep_last`` checkpoints and the newest
known-good one: a diverging run never rotates away the state it should be resumed from, even when the
weights blew up (finite, but huge) a step before the first non-finite loss.

Sharded runs (``runtime.parallel=fsdp|hsdp``) write ``checkpoint_<step>.dcp`` folders instead
(``fastibot.sharded``: every rank its shards, the same record with every file's size and SHA-256, the
same atomicity, rotation and fallback); everything here takes either kind.

Reading: a checkpoint is used only if its size and checksum match its record and it unpickles with
``torch.load(weights_only=True)`` (tensors and plain data only), so a file that would run code or build
arbitrary objects is refused, naming the file, before anything in it executes. From a run folder, the
newest checkpoint that passes is used, and each newer one that does not is named with the reason.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("fastibot")

_NAME = re.compile(r"^checkpoint_(\d{8,})\.(pt|dcp)$")  # a file, or a sharded checkpoint's folder
RECORD_SUFFIX = ".json"
SET_ASIDE_SUFFIX = ".superseded"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the file and says why."""


# --------------------------------------------------------------------------- writing


class _Writer:
    """File wrapper that remembers the OSError of a failed write: torch.save reports it only as an opaque
    RuntimeError ("unexpected pos ..."), and "disk full" must reach the user as such."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def record_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _why_not_written(e: BaseException, writer: Optional[_Writer]) -> str:
    cause = writer.error if writer is not None and writer.error is not None else e
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"the disk is full ({cause.strerror or cause})"
    return f"{type(cause).__name__}: {cause}"


def atomic_save(obj, path, **record) -> dict:
    """``torch.save`` to ``path`` atomically, with its record (bytes, sha256, ``record``) written beside it.

    Any failure (a full disk, a permission) raises :class:`CheckpointError` naming ``path``; the file that
    was there before, if any, is left as it was."""
    path = Path(path)
    writer = None
    tmp = None
    wrote_record = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        rec = {"file": path.name, "bytes": os.path.getsize(tmp), "sha256": _sha256(tmp), **record}
        _write_file(record_path(path), json.dumps(rec).encode())
        wrote_record = True
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return rec
    except Exception as e:
        if wrote_record and not path.exists():
            record_path(path).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {str(path)!r}: {_why_not_written(e, writer)}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def checkpoints(folder) -> list:
    """(step, path) of the run folder's checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / p.name) for p in folder.iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() == (m.group(2) == "dcp")]
    return sorted(found)


def read_record(path) -> Optional[dict]:
    try:
        rec = json.loads(record_path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def newest_good(folder) -> Optional[Path]:
    """The newest known-good checkpoint: every step from it to the next checkpoint was finite."""
    for _, path in reversed(checkpoints(folder)):
        rec = read_record(path)
        if rec is not None and rec.get("followed_by_finite"):
            return path
    return None


def _mark_good(path: Path) -> None:
    rec = read_record(path)
    if rec is None or rec.get("followed_by_finite"):
        return
    try:
        _write_file(record_path(path), json.dumps({**rec, "followed_by_finite": True}).encode())
    except OSError as e:
        log.warning("cannot update %s (%s)", record_path(path), e)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)


def save_checkpoint(folder, step: int, state: dict, keep_last: int, finite: bool = True,
                    keep_good: bool = True) -> Path:
    """Write ``checkpoint_<step>.pt`` and rotate: keep the newest ``keep_last``, and with ``keep_good`` the
    newest known-good one too (so ``keep_last=1`` can leave two while a run goes on).

    ``finite``: every step since the previous checkpoint was finite, which makes that one known good."""
    path = Path(folder) / f"checkpoint_{step:08d}.pt"
    before = [p for s, p in checkpoints(folder) if s < step]
    try:
        atomic_save(state, path, step=step, finite_since_previous=bool(finite), followed_by_finite=False)
    except CheckpointError as e:
        kept = f"the newest checkpoint on disk is {str(before[-1])!r}" if before else "no earlier checkpoint exists"
        raise CheckpointError(f"{e}; {kept}") from None
    rotate(folder, before, keep_last, finite, keep_good)
    return path


def rotate(folder, before: list, keep_last: int, finite: bool, keep_good: bool) -> None:
    """After a checkpoint was written: mark the one before it known good if ``finite``, then keep the newest
    ``keep_last`` (and with ``keep_good`` the newest known-good one)."""
    if finite and before:
        _mark_good(before[-1])
    found = checkpoints(folder)
    keep = {p for _, p in found[-keep_last:]}
    if keep_good:
        keep.add(newest_good(folder))
    for _, old in found:
        if old not in keep:
            _remove(old)


def latest_checkpoint(folder) -> Optional[Path]:
    found = checkpoints(folder)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- reading


def error_tail(e: Exception) -> str:
    """The last non-empty line of an error's message (where torch puts the mismatch), or its type's name."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def load_failure(e: Exception) -> str:
    """Why a file that torch.load (or safetensors) refused is not usable, as the end of a sentence."""
    if isinstance(e, pickle.UnpicklingError):
        # torch's message suggests turning the weights-only load off, i.e. running the file's code: keep only
        # the finding
        found = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower() or "unsupported" in ln.lower()]
        detail = f" ({found[0]})" if found else ""
        return (f"holds objects other than tensors and plain data{detail}; refused without running any of it "
                "(fastibot checkpoints hold only tensors and plain data)")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"cannot be read as a checkpoint ({type(e).__name__}: {first})"


def problem(path, need_record: bool = True) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used (None if it can): its record, size, checksum, and
    whether it unpickles as tensors and plain data (memory-mapped: the tensors are not read)."""
    path = Path(path)
    rec = read_record(path)
    if path.is_dir():
        from .sharded import problem as folder_problem
        return folder_problem(path, rec, need_record)
    if rec is None:
        if need_record:
            return f"it has no readable size and checksum record ({record_path(path).name})"
    else:
        try:
            size = path.stat().st_size
            if size != rec.get("bytes"):
                return f"it has {size} bytes but {rec.get('bytes')} were written (truncated or overwritten)"
            if _sha256(path) != rec.get("sha256"):
                return "its SHA-256 differs from the one written with it (the file was damaged or replaced)"
        except OSError as e:  # e.g. moved aside by the main process while another process looked at it
            return f"it cannot be read ({e.strerror or e})"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        return load_failure(e)
    return None


def find_checkpoint(target) -> Path:
    """A checkpoint file, or the newest usable checkpoint of a run folder (newer unusable ones are logged).

    A file must pass :func:`problem` (a file without a record is used with a warning: it was copied
    alone); a folder's checkpoints must, newest first, and the broken ones are left where they are."""
    target = Path(target)
    if target.is_dir() and not _NAME.match(target.name):  # a run folder (a sharded checkpoint is a folder too)
        found = checkpoints(target)
        if not found:
            raise FileNotFoundError(f"no checkpoint_*.pt in {str(target)!r}")
        skipped = []
        for _, path in reversed(found):
            why = problem(path)
            if why is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, why)
            skipped.append(f"{path.name}: {why}")
        raise CheckpointError(f"no usable checkpoint in {str(target)!r} (" + "; ".join(skipped) + ")")
    if not target.exists():
        raise FileNotFoundError(f"{str(target)!r} is neither a checkpoint file nor a run folder")
    if read_record(target) is None:
        log.warning("checkpoint %s has no size and checksum record beside it: not verified", target)
    why = problem(target, need_record=False)
    if why is not None:
        raise CheckpointError(f"checkpoint {str(target)!r}: {why}")
    return target


def resolve_resume(resume: str, output_dir: str) -> Path:
    """``--resume`` with a file, a run folder, or ``auto``/``latest`` (this run's folder)."""
    target = Path(output_dir) if resume in ("auto", "latest", "") else Path(resume)
    try:
        return find_checkpoint(target)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--resume: {e}") from None


def load_checkpoint(path, map_location="cpu", verify: bool = True) -> dict:
    """Tensors and plain data only (``weights_only=True``); :class:`CheckpointError` names the file.
    ``verify=False`` when :func:`find_checkpoint` has just checked it."""
    if verify:
        path = find_checkpoint(path)
    if Path(path).is_dir():  # a sharded checkpoint: whole student and teacher, read in this process
        from .sharded import describe, errors, read_full
        try:
            return read_full(path)
        except errors() as e:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({describe(e)})") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} {load_failure(e)}") from None
    if isinstance(state, dict) and "finetune" in state:  # fastibot finetune's checkpoints hold a timm classifier
        raise CheckpointError(f"checkpoint {str(path)!r} is from a fine-tuning run (fastibot finetune), not a "
                              "pretraining run: give the pretraining run folder or one of its checkpoints")
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a fastibot checkpoint (no config in it)")
    return state


def set_aside_after(folder, step: int) -> None:
    """On resume at ``step``: rename the folder's checkpoints of later steps (a broken newest one, or a
    diverged branch) to ``*.superseded``; the resumed run would otherwise overwrite or rotate them."""
    for s, path in checkpoints(folder):
        if s > step:
            aside = path.with_name(path.name + SET_ASIDE_SUFFIX)
            os.replace(path, aside)
            if record_path(path).exists():
                os.replace(record_path(path), record_path(aside))
            log.warning("kept %s as %s: it is newer than the resumed step %d", path.name, aside.name, step)


# --------------------------------------------------------------------------- random generators


def rng_state(device: torch.device) -> dict:
    """Every generator a step draws from, as tensors and plain numbers (so ``weights_only`` loads it)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    py = rng["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def rng_plain(rng: dict) -> dict:
    """:func:`rng_state` as JSON-ready plain data (for a sharded checkpoint's ``fastibot.json``)."""
    def plain(v):
        if torch.is_tensor(v):
            return {"dtype": str(v.dtype).removeprefix("torch."), "values": v.tolist()}
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
    return plain(rng)


def rng_from_plain(data: dict) -> dict:
    """The inverse of :func:`rng_plain` (dtypes from a fixed list: nothing is looked up by name elsewhere)."""
    dtypes = {"uint8": torch.uint8, "int64": torch.int64}

    def back(v):
        if isinstance(v, dict) and set(v) == {"dtype", "values"}:
            return torch.tensor(v["values"], dtype=dtypes[v["dtype"]])
        return {k: back(x) for k, x in v.items()} if isinstance(v, dict) else v
    return back(data)
