"""Atomic writes and safe checkpoint loading.

Every file ekdc writes goes to a temporary name in the same folder and is renamed into place, so a
kill at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import pickle
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; run folders and caches are then not guarded
    fcntl = None

_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(UserError):
    """A file could not be written (full disk, quota, permissions, file-size limit): one line naming it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync and rename it onto ``path``.

    Any I/O error while writing ends in a ``WriteError`` naming ``path``; the temporary file is removed
    and whatever ``path`` held before is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(f"cannot write to {path.parent}: {err.strerror or err}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def replace_into(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a finished file onto ``dst`` in one step (same filesystem), as a WriteError naming ``dst``."""
    try:
        os.replace(src, dst)
    except OSError as err:
        raise WriteError(f"cannot write {dst}: {err.strerror or err}") from None


@contextlib.contextmanager
def writes_into(folder: str | os.PathLike) -> Iterator[None]:
    """A write that fails inside names the folder the user asked for, not a temporary file in it."""
    try:
        yield
    except WriteError as err:
        raise WriteError(f"cannot write into {folder}: {str(err).rsplit(': ', 1)[-1]}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written in it (one line, exit 2 if not)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {path} is a file, not a folder: give another")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ekdc-probe-"):
            pass
    except OSError as err:
        raise UserError(f"output folder {path} is not writable: {err.strerror or err}") from None
    return path


def leaves_no_new_empty_folder(arg: str):
    """Decorate a function whose ``arg`` names its output folder: when it fails, the folders it made for it (the
    folder and any missing parents) are removed again if they are still empty, so that a refused or failed
    command (a full disk, a bad input found late) leaves nothing the user did not have."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments[arg]
            missing, folder = [], Path(given).absolute() if given is not None else None
            while folder is not None and not folder.exists() and folder != folder.parent:
                missing.append(folder)
                folder = folder.parent
            try:
                return fn(*args, **kwargs)
            except BaseException:
                for made in missing:  # the deepest first; one that holds anything stays, and so its parents
                    try:
                        made.rmdir()
                    except OSError:
                        break
                raise
        return run
    return wrap


# what a report flag writes: an existing file is replaced only when it is one of those (or empty), so that a
# slip of the finger (--json recipe.yaml, --plot notes.txt) never turns a user's file into a report
REPORT_KINDS = {"json": "a JSON file", "plot": "a PNG image"}


def _replaceable_report(flag: str, path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return True
        if flag == "plot":
            with open(path, "rb") as fh:
                return fh.read(8) == b"\x89PNG\r\n\x1a\n"
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):  # unreadable, not UTF-8 (a UnicodeDecodeError is a ValueError), not JSON
        return False


def check_outputs(inputs: dict[str, str | os.PathLike], *, derived: Optional[dict[str, str]] = None,
                  **paths: Optional[str | os.PathLike]) -> None:
    """Before any work: no output file (``--json``, ``--plot``, ``--out``: the keyword is the flag) may be one of
    the command's inputs (``{what it is: its path}``) or lie inside an input folder, where a report would
    overwrite a model, a recipe or an image; and each must be a writable file name. ``derived`` names an
    output the user did not give but the command chose (``{"plot": "the plot beside --out"}``), so that a
    refusal does not blame a flag that was never typed."""
    given = {flag: Path(p) for flag, p in paths.items() if p is not None}
    real = {flag: path.resolve() for flag, path in given.items()}
    sources = {what: (Path(source), Path(source).resolve()) for what, source in inputs.items()}
    called = {flag: (derived or {}).get(flag, f"--{flag}") for flag in given}
    for flag, path in given.items():
        twin = next((f for f in given if f != flag and real[f] == real[flag]), None)
        if twin is not None:  # the second report would overwrite the first
            raise UserError(f"{called[flag]} and {called[twin]} are the same file {path}: give each its own")
        if path.is_dir():
            raise UserError(f"{called[flag]} {path} is a folder; give a file name")
        for what, (source, source_real) in sources.items():
            if real[flag] == source_real:
                raise UserError(f"{called[flag]} {path} is the {what}: give --{flag} another file")
            if source.is_dir() and real[flag].is_relative_to(source_real):
                raise UserError(f"{called[flag]} {path} lies inside the {what} {source}: give --{flag} a file "
                                f"outside it")
        if flag in REPORT_KINDS and not _replaceable_report(flag, path):
            raise UserError(f"{called[flag]} {path} exists and is not {REPORT_KINDS[flag]}: it is left as it is; give "
                            f"--{flag} another file (or remove it)")
        ensure_writable_dir(path.parent)


def existing_file(path: str | os.PathLike, what: str, kind: str) -> Path:
    """``path`` as a Path, or one line: not found, or a folder where a ``kind`` file was expected."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not {kind}")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:


    # serialised in memory first: torch.save reports a failed file write as a RuntimeError of its own,
    # a plain write reports it as the OSError it is
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


# what torch.load raises on a file that is not a torch save: pickle's opcodes read arbitrary bytes, so a text
# or truncated file fails with whatever its first bytes happen to trigger (KeyError, IndexError, struct.error...)
UNREADABLE_TORCH_FILE = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError, KeyError, IndexError,
                         struct.error, TypeError, AttributeError)


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain data, never code."""


    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_TORCH_FILE:
        # torch's own message here is about its weights_only default, which would mislead
        raise UserError(f"{what} {path} is corrupt or not an ekdc checkpoint (it cannot be read as tensors and plain data)") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"{what} {path} is not an ekdc checkpoint (no 'state_dict' in it)")
    return obj


# --------------------------------------------------------------------------------------------------
# locks


_HELD: "set[FileLock]" = set()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the lock files inherited from the parent. An
    ``flock`` lock lives as long as any process keeps its file open, so a worker outliving a parent
    killed by ``kill -9`` would otherwise keep the run folder locked."""
    for lock in list(_HELD):
        if lock._fh is not None:
            with contextlib.suppress(OSError):
                lock._fh.close()  # the child's descriptor only: the parent's lock stays held
            lock._fh = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class FileLock:
    """An exclusive advisory lock on a file, held by one process.

    ``flock`` locks die with their process, so a process killed by ``kill -9`` leaves nothing that blocks
    the next one (forked workers close their inherited copy of the lock file at once). The file holds
    the holder's pid, which a refused process names."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    def try_acquire(self) -> Optional[str]:
        """Take the lock; returns None on success, else the holder's pid as text ("?" if unknown)."""
        if fcntl is None:
            return None
        path = self.path
        while True:
            fh = open(path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                fh.close()
                return holder
            # the holder before us may have removed the file after we opened it: then lock the new one
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        _HELD.add(self)
        return None

    def release(self) -> None:
        _HELD.discard(self)
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiter re-checks the inode it locked
        self._fh.close()
        self._fh = None

    def acquire(self) -> "FileLock":
        holder = self.try_acquire()
        if holder is not None:
            raise UserError(f"{self.path} is held by process {holder}")
        return self

    def wait(self, on_wait: Callable[[str], None], poll_s: float = 1.0) -> "FileLock":
        """Take the lock, waiting for its holder to finish; ``on_wait(holder_pid)`` is called once."""
        holder = self.try_acquire()
        if holder is not None:
            on_wait(holder)
            while self.try_acquire() is not None:
                time.sleep(poll_s)
        return self

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
