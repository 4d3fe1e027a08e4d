"""File primitives of the kit: atomic writes (bytes, text, JSON, CSV, whole folders), the
sha256 of a file, an exclusive file lock, a folder held by one process at a time (``hold_folder``),
and the UTC time stamp of records.

Every step writes its results through these, so an interrupted run never leaves a half-written
file that a later table or figure would silently read (temporary file in the same folder, then
``os.replace``). A leaf of the package: it imports nothing of the kit, and every other part of
``rt_lib`` may import it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable


# ---------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        readable_by_all(tmp)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (the kit's one file-digest helper)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def readable_by_all(*paths: str | os.PathLike) -> None:
    """Give files the mode a plain ``open`` would (0666 less the umask, usually 0644): some writers
    (``tempfile.mkstemp``, safetensors' ``save_file``) create 0600 files, which other users of a
    shared results folder or cache could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        os.chmod(p, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a new temporary folder beside ``final``; when the block succeeds it replaces
    ``final`` in one rename (an existing ``final`` is moved aside first, then deleted), so a
    reader sees the old folder or the new one, never a half-written one. On error the
    temporary folder is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        readable_by_all(*(p for p in tmp.rglob("*") if p.is_file()))
        old = final.parent / f".{final.name}.old-{tag}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_jsonable(obj: Any) -> Any:
    """``json.dumps`` default: paths, dtypes, numpy/torch scalars, dataclasses, sets."""
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        return obj.item()  # numpy / torch scalars
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    return str(obj)  # torch.dtype, torch.device, ...


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON, atomically; ``indent=None`` writes it compact (large records, such as
    per-document scores, take about half the bytes)."""
    separators = None if indent is not None else (",", ":")
    text = json.dumps(obj, indent=indent, separators=separators, sort_keys=False, default=to_jsonable, allow_nan=True)
    return atomic_write_text(path, text + "\n")


def write_csv(path: str | os.PathLike, rows: Any, columns: Iterable[str] | None = None) -> Path:
    """Write a DataFrame or a list of dicts as CSV (no index), atomically.

    For dicts the columns are ``columns`` if given, else the keys in order of first
    appearance across rows; missing values are written as empty cells.
    """
    if hasattr(rows, "to_csv"):  # pandas DataFrame
        frame = rows if columns is None else rows[list(columns)]
        return atomic_write_text(path, frame.to_csv(index=False))
    rows = [dict(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Exclusive advisory lock on ``path`` (a folder, or a file created if missing).

    Locking a folder leaves no lock file behind; a no-op where fcntl is absent (Windows).
    Hand-written rather than ``filelock.FileLock``: that needs a lock file, which would be left
    in every run folder (and committed with the results).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


LOCK_FILE = ".lock"  # <folder>/.lock: who holds the folder (JSON), locked while they run
LOCK_HOLDER_ENV = "RT_KIT_LOCK_HOLDER"  # the holder's pid, inherited by the processes it starts
_held: dict[str, int] = {}  # resolved folder -> open descriptor of its lock file


class FolderBusy(OSError):
    """Another live process holds the folder (``hold_folder``)."""


def hold_folder(folder: str | os.PathLike, what: str = "") -> None:
    """Hold an exclusive lock on ``folder`` for the rest of this process (``release_folder`` ends it
    earlier), so that two processes never write one run folder at once.

    The lock is an advisory ``flock`` on ``<folder>/.lock``, which the kernel releases when the
    process ends however it ends (a killed run leaves the file, not the lock). The file says who
    holds it (pid, host, command, start time); a second process gets ``FolderBusy`` with that
    text. Re-entrant within a process; a process started by the holder (a notebook kernel of the
    pipeline: ``RT_KIT_LOCK_HOLDER`` names the holder's pid) works under its parent's lock. A
    no-op where fcntl is absent (Windows).
    """
    try:
        import fcntl
    except ImportError:
        return
    import socket
    import sys

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        if holder.get("pid") is not None and str(holder.get("pid")) == os.environ.get(LOCK_HOLDER_ENV) \
                and holder.get("host") == socket.gethostname():
            return  # our parent holds it for us
        who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('what') or holder.get('command')}), "
               f"since {holder.get('started')}") if holder else "another process"
        raise FolderBusy(f"{folder} is in use by {who}: wait for it to finish (or stop it), or choose another "
                         "folder; two processes writing one run folder would overwrite each other's results") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now(), "what": what,
            "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd
    os.environ[LOCK_HOLDER_ENV] = str(os.getpid())


def release_folder(folder: str | os.PathLike) -> None:
    """Release a lock taken with ``hold_folder`` by this process (no-op if it holds none)."""
    fd = _held.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
