"""File primitives of the kit: atomic writes (bytes, text, JSON, CSV, whole folders), the
sha256 of a file, an exclusive file lock, and the UTC time stamp of records.

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
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
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


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=to_jsonable, allow_nan=True)
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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
