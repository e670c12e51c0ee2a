"""Sharded checkpoints (``runtime.parallel = fsdp | hsdp``): ``torch.distributed.checkpoint`` folders.

Layout: ``checkpoint_<step>.dcp/`` holds each rank's shards (``__<rank>_<i>.distcp``), DCP's index
(``.metadata``) and ``fastibot.json`` (plain data: step, config, metric names, random generator states,
world size, parallel mode); ``checkpoint_<step>.dcp.json`` beside it is the record (every file's size
and SHA-256, and the same known-good flags as a single-file checkpoint's record).

Writing is atomic: all ranks write into ``.checkpoint_<step>.dcp.tmp/``; each hashes its own files; rank
0 collects the hashes, writes the record, then renames the folder. A crash before the rename leaves no
visible checkpoint (the next save or ``--overwrite`` removes the temporary folder).

Reading is by name, not by rank: DCP maps every saved tensor's pieces onto the shards the reading run
holds, so a checkpoint saved by 4 FSDP ranks loads into 2 FSDP ranks, into an HSDP mesh or into one
process's whole tensors. Loading runs no code from the folder: tensors are read with
``torch.load(weights_only=True)`` (DCP's reader), the index is unpickled with an allow-list of DCP's
own metadata classes (:class:`SafeReader`; DCP itself would unpickle anything), and entries that are
not tensors are refused (fastibot writes none).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

SUFFIX = ".dcp"
META = "fastibot.json"
INDEX = ".metadata"


class UnsafeCheckpoint(pickle.UnpicklingError):
    pass


_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, e.g. "torch.strided"
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def _allowed(module: str, name: str) -> bool:
    """dtypes, the few helpers above, and the classes DCP defines for its index."""
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    if module == "torch.distributed.checkpoint.metadata":
        from torch.distributed.checkpoint import metadata
        cls = getattr(metadata, name, None)
        return isinstance(cls, type) and cls.__module__ == module
    return (module, name) in _ALLOWED


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if not _allowed(module, name):
            raise UnsafeCheckpoint(f"its {INDEX} refers to {module}.{name}, which is not checkpoint metadata")
        return super().find_class(module, name)


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader, with its index unpickled through an allow-list."""

        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / INDEX, "rb") as f:
                metadata = _IndexUnpickler(f).load()
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
            if not isinstance(metadata, Metadata):
                raise UnsafeCheckpoint(f"its {INDEX} is not a checkpoint index")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise UnsafeCheckpoint(f"entry {read_item.dest_index.fqn!r} is not a tensor (fastibot writes only tensors)")

    return TensorsOnly()


def errors() -> tuple:
    """What DCP raises: its CheckpointException derives from BaseException, so ``except Exception`` misses it."""
    from torch.distributed.checkpoint.api import CheckpointException
    return (Exception, CheckpointException)


def cause(e: BaseException) -> BaseException:
    """The first rank's own error inside a CheckpointException (which carries every rank's traceback)."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def describe(e: BaseException) -> str:
    """One line: the error's type and the first line of its message."""
    e = cause(e)
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def is_sharded_checkpoint(path) -> bool:
    path = Path(path)
    return path.name.endswith(SUFFIX) and (path / INDEX).is_file()


def read_meta(path) -> dict:
    meta = json.loads((Path(path) / META).read_text())
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{META} is not a fastibot checkpoint description")
    return meta


def load(path, tensors: dict, distributed: bool) -> None:
    """Read ``tensors`` (nested dicts of tensors: whole, or FSDP2 shards) in place from the checkpoint
    folder ``path``; a collective over all ranks when ``distributed``."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns that one process without a group loads alone: as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=_reader_class()(str(path)), planner=_planner(), no_dist=not distributed)


def read_full(path, parts=("student", "teacher")) -> dict:
    """One process, no process group: ``{"config", "step", "centers", part: whole state dict ...}`` from a sharded
    checkpoint, the models built from its config to receive the tensors (for export and evaluation)."""
    from .export import config_from_checkpoint
    from .models.ibot import build_model

    meta = read_meta(path)
    cfg = config_from_checkpoint(meta)
    out = {"config": meta["config"], "step": meta["step"]}
    tensors = {p: build_model(cfg, student=p == "student").state_dict() for p in parts}
    tensors["centers"] = {"center": torch.zeros(1, cfg.model.out_dim),
                          "center2": torch.zeros(1, cfg.model.patch_out_dim)}
    load(path, tensors, distributed=False)
    out.update(tensors)
    return out


# --------------------------------------------------------------------------- writing


def _hash_files(folder: Path, names) -> dict:
    from .checkpoint import _sha256
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}


def _agree(error: Optional[str], world: int) -> Optional[str]:
    """Rank 0's outcome on every rank."""
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    return error


def save(folder, step: int, tensors: dict, meta: dict, rank: int, world: int, finite: bool = True) -> Optional[Path]:
    """Every rank writes its shards of ``tensors``; rank 0 writes ``meta`` and the record, then makes the
    checkpoint visible. Returns the folder on rank 0 (None elsewhere); raises the same
    :class:`~fastibot.checkpoint.CheckpointError` on every rank if any rank failed."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import CheckpointError, _why_not_written, _write_file

    folder = Path(folder)
    final = folder / f"checkpoint_{step:08d}{SUFFIX}"
    tmp = folder / f".{final.name}.tmp"
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt (the run folder is locked: ours)
            tmp.mkdir(parents=True)
            _write_file(tmp / META, json.dumps(meta).encode())
        except OSError as e:
            error = f"cannot write {str(final)!r}: {_why_not_written(e, None)}"
    error = _agree(error, world)
    if error is None:
        try:
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=world == 1 and
                     not dist.is_initialized())
            mine = [n for n in os.listdir(tmp) if n.startswith(f"__{rank}_")]
            if rank == 0:
                mine += [INDEX, META]
            mine = _hash_files(tmp, mine)
        except errors() as e:  # a full disk on one rank: DCP raises it on every rank
            mine = f"cannot write {str(final)!r}: {_why_not_written(cause(e), None)}"
        parts = [None] * world
        if world > 1:
            dist.all_gather_object(parts, mine)
        else:
            parts = [mine]
        if rank == 0:
            error = next((p for p in parts if isinstance(p, str)), None)
            if error is None:
                error = _publish(tmp, final, {k: v for p in parts for k, v in p.items()}, step, finite)
        error = _agree(error, world)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(error)
    return final if rank == 0 else None


def _publish(tmp: Path, final: Path, files: dict, step: int, finite: bool) -> Optional[str]:
    """Write the record, then rename the folder into place; an error message, or None."""
    from .checkpoint import _fsync_dir, _write_file, record_path

    present = set(os.listdir(tmp))
    if present != set(files):
        return (f"cannot write {str(final)!r}: files {sorted(present ^ set(files))} were not accounted for by the "
                "ranks that wrote it")
    try:
        rec = {"file": final.name, "format": "dcp", "files": files, "step": step,
               "finite_since_previous": bool(finite), "followed_by_finite": False}
        _write_file(record_path(final), json.dumps(rec).encode())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        if not final.exists():
            record_path(final).unlink(missing_ok=True)
        return f"cannot write {str(final)!r}: {e.strerror or e}"
    return None


# --------------------------------------------------------------------------- checking


def problem(path, rec: Optional[dict], need_record: bool = True) -> Optional[str]:
    """Why the checkpoint folder cannot be used (None if it can): its record lists every file with its size
    and SHA-256 (a folder copied without its record is checked for the rest), the index unpickles as
    checkpoint metadata only, ``fastibot.json`` is plain data."""
    path = Path(path)
    if rec is None and need_record:
        return f"it has no readable size and checksum record ({path.name}.json)"
    files = rec.get("files") if rec is not None else None
    if rec is not None and not isinstance(files, dict):
        return "its record does not list the checkpoint's files"
    try:
        present = set(os.listdir(path))
        if files is not None and present != set(files):
            return f"its files differ from the record ({', '.join(sorted(present ^ set(files)))})"
        for name, want in (files or {}).items():
            got = _hash_files(path, [name])[name]
            if got["bytes"] != want.get("bytes"):
                return (f"{name} has {got['bytes']} bytes but {want.get('bytes')} were written "
                        "(truncated or overwritten)")
            if got["sha256"] != want.get("sha256"):
                return f"the SHA-256 of {name} differs from the one written with it (damaged or replaced)"
        read_meta(path)
        with open(path / INDEX, "rb") as f:
            _IndexUnpickler(f).load()
    except UnsafeCheckpoint as e:
        return f"{e}; refused without running any of it (fastibot checkpoints hold only tensors and plain data)"
    except (OSError, ValueError) as e:
        return f"it cannot be read ({e})"
    except Exception as e:  # a damaged index
        return f"its {INDEX} cannot be read ({type(e).__name__}: {str(e)[:200]})"
    return None
