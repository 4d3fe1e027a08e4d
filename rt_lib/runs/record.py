"""Run folders and the provenance sidecar (run.json).

Every step of the kit writes into one run folder ``results/runs/<run-id>/`` (layout in
docs/results_format.md). ``run.json`` records what produced the files: each step's options
(``parameters.<step>``), what each step did (``steps.<step>``), package versions, git revision,
device. Files are written atomically (``rt_lib.files``: temporary file in the same
folder, then ``os.replace``) so an interrupted run never leaves a half-written CSV/JSON
that a later table or figure would silently read.

    run_dir = new_run(preset="cpu")
    ...
    write_csv(run_dir / "eval" / "results.csv", rows)
    update_run(run_dir, "eval", {"wall_time_s": 12.3}, parameters={"task_set": "quick", "tasks": ["piqa"]})

Reruns (``STEPS``, ``start_step``, ``finish_step``, ``step_state``): the pipeline starts each step
with ``start_step``, which refuses to replace the results of a completed step unless
``replace=True``, then moves them to ``replaced/<step>-<time>/`` and moves aside, marking them
stale, the results of later steps that used them. Each step records the sha256 of the files it
used (the routers), so a step whose inputs changed in any other way reads as stale too.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from rt_lib.files import atomic_write_json, file_lock, to_jsonable, utc_now

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
DEFAULT_ROOT = "results/runs"
# Packages whose versions every run records (docs/results_format.md); the rest are extras
# that explain differences in numbers between machines.
_VERSIONED = ("torch", "transformers", "lm_eval", "rt_lib")
_EXTRA_VERSIONED = ("datasets", "accelerate", "peft", "safetensors", "tokenizers", "gguf")
_DIST_NAMES = {"lm_eval": "lm-eval", "rt_lib": "rt-kit"}


# ---------------------------------------------------------------------------- provenance
def _version(module: str) -> str | None:
    try:
        return metadata.version(_DIST_NAMES.get(module, module))
    except metadata.PackageNotFoundError:
        if module == "rt_lib":  # running from a source tree that was never pip-installed
            import rt_lib

            return rt_lib.__version__
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_revision(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"revision": sha or None, "dirty": bool or None}`` of the git tree holding ``path``.

    Defaults to the kit's own source tree; ``dirty`` ignores untracked files (results being
    written are untracked and should not mark the code as modified).
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    rev = _git(["rev-parse", "HEAD"], cwd)
    if not rev:
        return {"revision": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"revision": rev, "dirty": None if status is None else bool(status)}


def device_name() -> str:
    """``cpu`` or ``cuda:<device name>``, as recorded in run.json."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(torch.cuda.current_device())}"
    return "cpu"


def provenance() -> dict[str, Any]:
    """Versions, git revision, device and threads of the current process."""
    import torch

    git = git_revision()
    return {
        "versions": {
            "python": platform.python_version(),
            **{m: _version(m) for m in _VERSIONED},
        },
        "extra_versions": {m: _version(m) for m in _EXTRA_VERSIONED},
        "git_revision": git["revision"],
        "git_dirty": git["dirty"],
        "device": device_name(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python_executable": sys.executable,
    }


# ---------------------------------------------------------------------------- run folders
def _default_run_id(root: Path, preset: str | None) -> str:
    base = time.strftime("%Y%m%d-%H%M%S") + (f"-{preset}" if preset else "")
    run_id, i = base, 1
    while (root / run_id).exists():
        i += 1
        run_id = f"{base}-{i}"
    return run_id


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): restore it from version control or a backup, "
                             "or move the run folder aside and start a new run") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds {type(record).__name__}, not a run record (a JSON object)")
    return record


def new_run(
    root: str | os.PathLike = DEFAULT_ROOT,
    run_id: str | None = None,
    preset: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> Path:
    """Create ``<root>/<run_id>/`` with a fresh ``run.json`` and return the folder.

    ``preset``: the pipeline preset (``notebooks/presets/<name>.json``) the run is made with; None
    for a run made outside the pipeline (``train``, ``evaluate``, ``profile``, ``evidence``: their
    recipe, task set or grid is in ``parameters.<step>``). ``run_id`` defaults to
    ``<local time YYYYmmdd-HHMMSS>-<preset>``. If the folder already holds a
    run.json (a notebook re-run with the same id), its ``created`` time and ``steps`` are
    kept, ``parameters`` are merged and the provenance is refreshed; the previous
    provenance is kept under ``history`` so nothing is silently lost.
    """
    root = Path(root)
    run_id = run_id or _default_run_id(root, preset)
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise ValueError(f"invalid run id {run_id!r}: use a plain folder name")
    run_dir = root / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir):
        record: dict[str, Any] = {
            "run_id": run_id,
            "created": utc_now(),
            "preset": preset,
            "parameters": dict(parameters or {}),
            **provenance(),
            "steps": {},
        }
        path = run_dir / RUN_FILE
        if path.exists():
            old = load_run(run_dir)
            log.info("run folder %s exists; refreshing its run.json", run_dir)
            record["created"] = old.get("created", record["created"])
            record["preset"] = preset if preset is not None else old.get("preset")
            record["parameters"] = {**old.get("parameters", {}), **record["parameters"]}
            record["steps"] = old.get("steps", {})
            # anything else the run recorded (replacements, ...) stays
            record = {**{k: v for k, v in old.items() if k not in record and k != "history"}, **record}
            prev = {k: old.get(k) for k in ("preset", "versions", "git_revision", "git_dirty", "device")}
            record["history"] = [*old.get("history", []), {"replaced": utc_now(), **prev}]
        atomic_write_json(path, record)
    return run_dir


def update_run(run_dir: str | os.PathLike, step: str, info: Mapping[str, Any],
               parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``info`` (what the step did: status, files, result summaries) into ``steps.<step>``
    of run.json (shallow merge) and, when given, record ``parameters`` (every option the step ran
    with) as ``parameters.<step>``, the one place readers look for a step's configuration
    (``rt_lib.runs.read.setting``). Returns the record."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: create the run with rt_lib.runs.record.new_run first")
    with file_lock(run_dir):
        record = load_run(run_dir)
        steps = record.setdefault("steps", {})
        entry = steps.setdefault(step, {})
        entry.update(json.loads(json.dumps(dict(info), default=to_jsonable)))
        entry["updated"] = utc_now()
        if parameters is not None:
            record.setdefault("parameters", {})[step] = json.loads(json.dumps(dict(parameters), default=to_jsonable))
        atomic_write_json(path, record)
    return record

