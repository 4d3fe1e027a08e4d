"""The kit's cache of converted models and cleaned text, and its integrity rules.

A cached asset is a folder whose manifest (written last) lists the sha256 of every file. A
folder without a manifest, with a missing/changed file or an unreadable one is never trusted:
it is logged and rebuilt. Builds go to a temporary sibling folder that is renamed into place,
under a lock, so concurrent processes never see a half-written cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from rt_lib.files import atomic_dir, atomic_write_json, file_lock, file_sha256

log = logging.getLogger("rt_lib.assets.loading")

MANIFEST = "rt_kit_manifest.json"


class AssetError(RuntimeError):
    """A model or data set could not be found or read; the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted models and cleaned text live: ``$RT_KIT_CACHE`` or ``~/.cache/rt-kit``."""
    env = os.environ.get("RT_KIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rt-kit"


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    atomic_write_json(folder / MANIFEST, {**info, "files": files})


def cache_problem(folder: str | os.PathLike, version: str | None = None) -> str | None:
    """Why the cached folder cannot be trusted, or None if every file matches its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (incomplete build)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    if version is not None and manifest.get("cache_version") != version:
        return f"built by another kit version ({manifest.get('cache_version')!r} != {version!r})"
    if not files:
        return "manifest lists no files"
    for rel, meta in files.items():
        path = folder / rel
        try:
            if path.stat().st_size != meta["size"]:
                return f"{rel}: size {path.stat().st_size} != {meta['size']}"
            if file_sha256(path) != meta["sha256"]:
                return f"{rel}: sha256 mismatch"
        except OSError as e:
            return f"{rel}: unreadable ({e})"
    return None


def build_cached(
    target: Path, version: str, build: Callable[[Path], dict[str, Any]], what: str
) -> Path:
    """Return ``target`` after making sure it is a valid cache, building it if needed."""
    problem = cache_problem(target, version)
    if problem is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        problem = cache_problem(target, version)  # another process may have built it meanwhile
        if problem is None:
            return target
        if problem != "missing":
            log.warning("cached %s at %s is not trusted (%s); rebuilding", what, target, problem)
        else:
            log.info("building %s into %s (one time)", what, target)
        t0 = time.perf_counter()
        with atomic_dir(target) as tmp:
            info = build(tmp)
            write_manifest(tmp, {"cache_version": version, "built_s": round(time.perf_counter() - t0, 1), **info})
    return target
