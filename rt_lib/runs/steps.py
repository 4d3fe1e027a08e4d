"""The steps of a run folder: which step ran with which inputs, reruns into an existing folder
(refused, or with ``--replace`` the old results moved to ``<run>/replaced/``), and stale
results of later steps. Part of ``rt_lib.runs.record`` (importable from there)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from rt_lib.files import atomic_write_json, file_lock, file_sha256, hold_folder, utc_now
from rt_lib.runs.record import RUN_FILE, load_run, update_run

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- steps: rerun, replace, stale
# The steps of a run folder: the files each one writes (relative to the run folder) and the steps
# whose results it reads. `inputs` are the files of earlier steps whose sha256 the step records
# when it starts (`start_step`): a step whose inputs later change is stale. docs/results_format.md.
STEPS: dict[str, dict[str, Any]] = {
    "train": {"notebook": "01_router_tuning", "after": (),
              "outputs": ("train", "notebooks/01_router_tuning.ipynb"), "inputs": {}},
    "eval": {"notebook": "02_evaluation", "after": ("train",),
             "outputs": ("eval", "baselines", "notebooks/02_evaluation.ipynb"),
             "inputs": {"routers": "train/routers/routers.safetensors"}},
    "profile": {"notebook": "03_speedup_profiling", "after": ("train",),
                "outputs": ("profile", "notebooks/03_speedup_profiling.ipynb"),
                "inputs": {"routers": "train/routers/routers.safetensors"}},
}
REPLACED_DIR = "replaced"  # <run>/replaced/<step>-<time>/: results moved aside by a rerun
# The pipeline's presets (rt_lib.pipeline.notebooks runs them) and the parameters its runner sets
# for every notebook: what the refresh command of a stale step compares and leaves out.
PRESET_DIR = Path(__file__).resolve().parents[2] / "notebooks" / "presets"
RUNNER_PARAMETERS = ("run_dir", "preset")
# Notebook parameters renamed since run folders recorded them (old name -> name now, by notebook):
# what committed runs recorded is read under today's names (``current_parameters``), and
# ``reproduce -p`` still takes the old names, with a note (rt_lib.pipeline.notebooks.parse_overrides).
RENAMED_PARAMETERS = {
    "02_evaluation": {"eval_preset": "task_set"},
    "03_speedup_profiling": {"profile_preset": "profile_grid"},
}


def current_parameters(notebook: str, parameters: Mapping[str, Any]) -> dict:
    """A notebook's recorded ``parameters`` under today's names (``RENAMED_PARAMETERS``)."""
    renamed = RENAMED_PARAMETERS.get(notebook, {})
    return {renamed.get(name, name): value for name, value in parameters.items()}


class ResultsExist(FileExistsError):
    """Rerunning a step would replace results of a completed step (or make later ones stale)."""

    def __init__(self, run_dir: Path, blocking: list[tuple[str, str]], hint: str = ""):
        self.run_dir, self.blocking = Path(run_dir), blocking
        lines = [f"run folder {run_dir} already holds results that this rerun would replace:"]
        for step, why in blocking:
            present = [o for o in STEPS[step]["outputs"] if (Path(run_dir) / o).exists()]
            lines.append(f"  {step} ({', '.join(present) or 'no files'}): {why}")
        lines.append(f"Pass --replace (replace=True from Python) to move them to {Path(run_dir) / REPLACED_DIR}"
                     "/<step>-<time>/ first (nothing is deleted; later steps that used them are marked stale), "
                     "or choose another run id.")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))




def _relpath(path: Path, run_dir: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def _changed_inputs(run_dir: Path, entry: Mapping[str, Any]) -> list[str]:
    """Recorded inputs of a step whose file is gone or differs from the sha256 recorded at its start."""
    changed = []
    for name, info in (entry.get("inputs") or {}).items():
        if not isinstance(info, dict) or not info.get("path"):
            continue
        path = run_dir / info["path"]  # relative to the run folder (absolute paths stay absolute)
        if not path.is_file():
            changed.append(f"its {name} {info['path']} no longer exist")
        elif info.get("sha256") and file_sha256(path) != info["sha256"]:
            changed.append(f"its {name} {info['path']} changed after it ran")
    return changed


def step_state(run_dir: str | os.PathLike, record: Mapping[str, Any], step: str) -> tuple[str, str | None]:
    """``(state, reason)`` of ``steps.<step>`` in ``record`` (a loaded run.json).

    ``absent``: never recorded. ``interrupted``: started and not completed (``status: running``,
    or a training stopped early with ``finished: false``); a rerun resumes it without
    ``replace``. ``stale``: marked ``stale: true`` when a step it used was replaced, or one of
    its recorded ``inputs`` changed since (reason given). ``completed``: anything else recorded,
    including entries written before steps had a ``status``.
    """
    entry = (record.get("steps") or {}).get(step)
    if not isinstance(entry, dict):
        return "absent", None
    if entry.get("stale"):
        return "stale", str(entry.get("stale_reason") or "marked stale in run.json")
    if entry.get("status") == "running":
        return "interrupted", "started, not completed"
    if entry.get("finished") is False:
        return "interrupted", "stopped before its last step"
    changed = _changed_inputs(Path(run_dir), entry)
    if changed:
        return "stale", "; ".join(changed)
    return "completed", None


def _downstream(run_dir: Path, record: Mapping[str, Any], step: str) -> list[str]:
    """Steps that used ``step``'s results, transitively. A step that recorded its inputs depends on
    ``step`` only if one of them lies in ``step``'s outputs (e.g. an evaluation of another run's
    routers does not depend on this run's training); without recorded inputs, the ``after`` graph."""
    steps = record.get("steps") or {}
    found: list[str] = []
    frontier = [step]
    while frontier:
        up = frontier.pop()
        outs = [(run_dir / o).resolve() for o in STEPS[up]["outputs"]]
        for name, spec in STEPS.items():
            if up not in spec["after"] or name in found:
                continue
            entry = steps.get(name)
            inputs = (entry.get("inputs") if isinstance(entry, dict) else None) or {}
            paths = [(run_dir / i["path"]).resolve() for i in inputs.values() if isinstance(i, dict) and i.get("path")]
            if paths and not any(p == o or o in p.parents for p in paths for o in outs):
                continue
            found.append(name)
            frontier.append(name)
    return found


def _has_outputs(run_dir: Path, step: str) -> bool:
    return any((run_dir / o).exists() for o in STEPS[step]["outputs"])


def replace_plan(run_dir: str | os.PathLike, step: str,
                 record: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """What starting ``step`` in ``run_dir`` would replace: ``[(step, why), ...]``, empty when the
    step can start without ``replace`` (new, interrupted or stale, and no completed later step)."""
    run_dir = Path(run_dir)
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {list(STEPS)}")
    if record is None:
        if not (run_dir / RUN_FILE).exists():
            return []
        record = load_run(run_dir)
    blocking = []
    if step_state(run_dir, record, step)[0] == "completed":
        blocking.append((step, f"completed (notebook {STEPS[step]['notebook']}): would be rerun"))
    for d in _downstream(run_dir, record, step):
        if step_state(run_dir, record, d)[0] == "completed":
            blocking.append((d, f"completed with the results of {step}: would become stale"))
    return blocking


def _move_aside(run_dir: Path, step: str, stamp: str, entry: Any, parameters: Any, reason: str) -> str | None:
    """Move ``step``'s outputs to ``replaced/<step>-<stamp>/`` (relative paths kept) with its old
    run.json entry in ``step.json``; the folder's path relative to the run, or None if there were no files."""
    present = [o for o in STEPS[step]["outputs"] if (run_dir / o).exists()]
    if not present:
        return None
    dest = run_dir / REPLACED_DIR / f"{step}-{stamp}"
    i = 1
    while dest.exists():
        i += 1
        dest = run_dir / REPLACED_DIR / f"{step}-{stamp}-{i}"
    dest.mkdir(parents=True)
    for o in present:
        (dest / o).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / o, dest / o)
    atomic_write_json(dest / "step.json", {"step": step, "moved": utc_now(), "reason": reason, "files": present,
                                           "record": entry, "parameters": parameters})
    return dest.relative_to(run_dir).as_posix()


def start_step(run_dir: str | os.PathLike, step: str, replace: bool = False,
               inputs: Mapping[str, str | os.PathLike] | None = None, hint: str = "") -> dict[str, Any]:
    """Prepare ``run_dir`` for (re)running ``step``; call before the step writes anything.

    - A new or interrupted step (see ``step_state``) starts without ``replace``; the files of an
      interrupted attempt stay (training resumes from ``train/checkpoints``).
    - A completed step, or one whose later steps completed with its results, raises
      ``ResultsExist`` unless ``replace``: then its outputs move to
      ``replaced/<step>-<time>/`` (with its old run.json entry in ``step.json``).
    - Every later step that used its results (``_downstream``) has its files moved aside the same
      way and its entry replaced by ``{"stale": true, "stale_reason": ..., "moved_to": ...}``;
      rerunning such a step needs no ``replace``.
    - ``steps.<step>`` becomes ``{"status": "running", "started": ..., "inputs": {...}}``:
      ``inputs`` (name -> file; default ``STEPS[step]["inputs"]`` inside the run folder, when the
      file exists) are recorded with their sha256, path relative to the run folder. The step's
      writer merges its results with ``update_run`` and ``finish_step`` marks it completed.

    Returns the updated record. ``run.json`` must exist (``new_run``).
    """
    run_dir = Path(run_dir)
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {list(STEPS)}")
    if not (run_dir / RUN_FILE).exists():
        raise FileNotFoundError(f"{run_dir / RUN_FILE} does not exist: create the run with rt_lib.runs.record.new_run first")
    hold_folder(run_dir, f"step {step}")  # a step another live process runs is never resumed into
    wanted = {name: run_dir / rel for name, rel in STEPS[step]["inputs"].items()}
    wanted.update({name: Path(p) for name, p in (inputs or {}).items()})
    with file_lock(run_dir):
        record = load_run(run_dir)
        blocking = replace_plan(run_dir, step, record)
        if blocking and not replace:
            raise ResultsExist(run_dir, blocking, hint)
        steps = record.setdefault("steps", {})
        params = record.get("parameters") or {}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        state, _ = step_state(run_dir, record, step)
        moves = []
        if state in ("completed", "stale"):
            moved = _move_aside(run_dir, step, stamp, steps.get(step), params.get(step), "rerun with replace")
            if moved:
                moves.append({"step": step, "moved_to": moved, "reason": "rerun with replace", "at": utc_now()})
        for d in _downstream(run_dir, record, step):
            if step_state(run_dir, record, d)[0] in ("absent", "stale") and not _has_outputs(run_dir, d):
                continue  # never ran, or already stale with its files aside
            reason = f"{step} was rerun on {utc_now()}: these results were made with the previous {step} results"
            moved = _move_aside(run_dir, d, stamp, steps.get(d), params.get(d), reason)
            steps[d] = {"stale": True, "stale_reason": reason, "moved_to": moved, "updated": utc_now()}
            if moved:
                moves.append({"step": d, "moved_to": moved, "reason": reason, "at": utc_now()})
        if moves:
            record["replacements"] = [*record.get("replacements", []), *moves]
            log.warning("run folder %s: moved aside %s", run_dir, ", ".join(m["moved_to"] for m in moves))
        entry = {"status": "running", "started": utc_now(),
                 "inputs": {name: {"path": _relpath(p, run_dir), "sha256": file_sha256(p)}
                            for name, p in wanted.items() if p.is_file()}}
        if state == "interrupted":  # resuming: keep what the interrupted attempt recorded
            entry = {**steps.get(step, {}), **entry}
        steps[step] = entry
        atomic_write_json(run_dir / RUN_FILE, record)
    return record


def prepare_training(run_dir: str | os.PathLike, *, replace: bool = False, resuming: bool = False) -> None:
    """Claim ``run_dir`` for a training that writes ``train/`` there, the same rule wherever it is
    started (the pipeline, ``python -m rt_lib train --out``, notebook 01 run by hand).

    The folder is held for the rest of the process (``rt_lib.files.hold_folder``). Unless
    ``resuming`` (continuing from ``train/checkpoints``): in a run folder (``run.json``) the step
    starts with ``start_step``, so completed routers, or later steps made with them, are refused
    unless ``replace``, which moves them to ``replaced/`` and marks the later steps stale; and a
    ``train/`` that still has files (an interrupted training, or one of a folder without
    ``run.json``) is refused unless ``replace`` (moved to ``replaced/train-<time>/``)."""
    run_dir = Path(run_dir)
    hold_folder(run_dir, "training")
    if resuming:
        return
    if (run_dir / RUN_FILE).exists():
        start_step(run_dir, "train", replace=replace)
    train = run_dir / "train"
    if not (train.is_dir() and any(train.iterdir())):
        return
    summary = train / "summary.json"
    try:
        done = bool(json.loads(summary.read_text()).get("finished")) if summary.is_file() else False
    except ValueError:
        done = False
    if not done and not replace and not has_checkpoints(run_dir) and not (train / "routers").exists():
        # an attempt stopped before its first checkpoint: nothing to continue from, nothing finished
        moved = _move_aside(run_dir, "train", time.strftime("%Y%m%d-%H%M%S"), None, None,
                            "an interrupted training without a checkpoint; started over")
        log.warning("folder %s: an interrupted training without a checkpoint moved to %s", run_dir, moved)
        return
    if not replace:
        what = "a finished training (routers in train/routers)" if done else \
            "an interrupted training (checkpoints in train/checkpoints)"
        raise ResultsExist(run_dir, [("train", f"holds {what}")],
                           hint="To continue an interrupted training instead, pass --resume-from latest "
                                "(resume_from='latest').")
    moved = _move_aside(run_dir, "train", time.strftime("%Y%m%d-%H%M%S"), None, None, "rerun with replace")
    log.warning("folder %s: the previous training moved to %s", run_dir, moved)


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether ``<run_dir>/train/checkpoints`` holds a checkpoint to resume from."""
    return any((Path(run_dir) / "train" / "checkpoints").glob("step-*"))


def finish_step(run_dir: str | os.PathLike, step: str) -> dict[str, Any]:
    """Mark ``steps.<step>`` completed (``status: completed``, ``completed`` time)."""
    return update_run(run_dir, step, {"status": "completed", "completed": utc_now()})


def stale_steps(run_dir: str | os.PathLike, record: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{step: reason}`` for every stale step of the run (see ``step_state``)."""
    run_dir = Path(run_dir)
    record = load_run(run_dir) if record is None else record
    out = {}
    for step in STEPS:
        state, why = step_state(run_dir, record, step)
        if state == "stale":
            out[step] = why
    return out


def refresh_command(run_dir: str | Path, steps, record: dict | None = None) -> str:
    """The ``python -m rt_lib reproduce`` command that reruns ``steps`` (e.g. stale ones) into
    ``run_dir``: their notebooks with the parameters they last ran with (run.json
    ``steps.pipeline``) where those differ from the preset's."""
    import shlex

    run_dir = Path(run_dir)
    record = record or {}
    ran = ((record.get("steps") or {}).get("pipeline") or {})
    preset = record.get("preset") or ran.get("preset") or "cpu"
    nbs = [STEPS[s]["notebook"] for s in STEPS if s in set(steps)]
    try:
        sections = json.loads((PRESET_DIR / f"{preset}.json").read_text())
    except (OSError, ValueError):
        sections = {}
    if not isinstance(sections, dict):
        sections = {}
    extra = []
    for nb in nbs:
        used = current_parameters(nb, ((ran.get("notebooks") or {}).get(nb) or {}).get("parameters") or {})
        for name, value in used.items():
            if name not in RUNNER_PARAMETERS and sections.get(nb, {}).get(name, _MISSING) != value:
                extra += ["-p", shlex.quote(f"{nb}.{name}={json.dumps(value)}")]
    return " ".join(["python -m rt_lib reproduce", "--preset", shlex.quote(preset),
                     "--out", shlex.quote(str(run_dir.parent)), "--run-id", shlex.quote(run_dir.name),
                     "--notebooks", ",".join(nb[:2] for nb in nbs), *extra])


_MISSING = object()
