"""The run folder: one training run at a time, and a fresh run never writes over an older one.

- A run holds an exclusive ``flock`` on ``<runtime.output_dir>/.lock`` (which records its pid and
  host) from start to exit. The kernel drops the lock when the process dies, however it dies, so a
  lock left by a killed run is taken over (and said so); a second live run in the folder stops with
  a message naming the first. Forked children (loader workers) close their copy at once, so they
  never keep a dead run's lock alive.
- A fresh run (no ``--resume``) into a folder that already holds a run (``checkpoint_*`` files, sharded
  ``checkpoint_*.dcp`` folders or ``metrics.csv``) is an error, unless ``--overwrite`` is given: then that
  run's own files (checkpoints and their records, ``metrics.csv``, ``config.yaml``, TensorBoard event
  files in ``tb/``, leftover temporary files and folders) are deleted first, and nothing else in the
  folder is touched.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("fastibot")

LOCK_NAME = ".lock"
_held_fds: List[int] = []  # lock descriptors of this process, closed in forked children


class RunFolderError(RuntimeError):
    """The run folder is in use or holds another run; the message says what to do."""


def _close_in_child() -> None:
    # a forked child shares the lock's open file description: closing its copy leaves the parent's lock
    # alone, and keeps a child that outlives the parent from holding the lock in its name
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` or the end of the process."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a RunFolderError: under several processes claim() stops all of them together
            raise RunFolderError(f"runtime.output_dir {str(self.folder)!r} cannot be used ({e.strerror or e}: "
                                 f"{e.filename or self.folder}); choose a folder this process can write") from None
        previous = os.read(fd, 256).decode(errors="replace").split()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): a second run in this folder would not be detected", self.path, e)
                return self
            holder = f"pid {previous[0]} on {previous[1]}" if len(previous) >= 2 else "another process"
            raise RunFolderError(
                f"runtime.output_dir {str(self.folder)!r} is in use by a running fastibot run ({holder}); "
                "wait for it to finish, stop it, or choose another runtime.output_dir") from None
        if len(previous) >= 2:  # the kernel dropped that lock when its process died: a killed or crashed run
            log.warning("taking over the lock of %s left by a run that ended without releasing it (pid %s on %s)",
                        self.folder, previous[0], previous[1])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        _held_fds.append(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        if self.fd in _held_fds:
            _held_fds.remove(self.fd)
        try:
            os.ftruncate(self.fd, 0)  # a pid left in the file means its run ended without releasing the lock
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


def run_files(folder) -> List[Path]:
    """Files of a run in ``folder`` that a fresh run would write over or rotate away."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() and (p.name.startswith("checkpoint_") or p.name == "metrics.csv"))
                  or (p.is_dir() and p.name.startswith("checkpoint_") and p.name.endswith(".dcp")))


def _overwritable(folder: Path) -> List[Path]:
    names = run_files(folder) + [folder / "config.yaml"]
    names += [p for p in folder.glob(".checkpoint_*.tmp")]  # a file, or a sharded checkpoint's folder
    names += [p for p in (folder / "tb").glob("events.out.tfevents.*")] if (folder / "tb").is_dir() else []
    return [p for p in names if p.is_file() or p.is_dir() and p.name.startswith((".checkpoint_", "checkpoint_"))]


def check_fresh(folder, overwrite: bool) -> None:
    """A fresh run may start in ``folder``: it holds no run, or ``overwrite`` deletes that run's files."""
    folder = Path(folder)
    existing = run_files(folder)
    if not existing:
        return
    if not overwrite:
        shown = ", ".join(p.name for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise RunFolderError(
            f"runtime.output_dir {str(folder)!r} already holds a run ({shown}): continue it with --resume, "
            "choose another runtime.output_dir, or pass --overwrite to delete that run's checkpoints, "
            "metrics and TensorBoard events first")
    doomed = _overwritable(folder)
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.warning("--overwrite: deleted %d files of the earlier run in %s", len(doomed), folder)


def claim(folder, rt, resume: Optional[str] = None, overwrite: bool = False) -> Optional[RunLock]:
    """Lock ``folder`` for this run (main process) and check that a fresh run may start there.

    Under several processes the main process decides and all of them stop together if it cannot go on
    (one all-reduce), rather than the others waiting for it forever."""
    lock, error = None, None
    if rt.is_main:
        try:
            if resume is not None and overwrite:
                raise RunFolderError("--overwrite deletes the run that --resume would continue: use one of them")
            lock = RunLock(folder).acquire()
            if resume is None:
                check_fresh(folder, overwrite)
        except RunFolderError as e:
            error = e
    if rt.world > 1:
        flag = torch.tensor([float(error is not None)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bool(flag.item()) and error is None:  # sync-ok: once at start
            error = RunFolderError("the main process cannot use runtime.output_dir (see its message)")
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    return lock
