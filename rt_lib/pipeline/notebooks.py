"""The notebook pipeline: execute notebooks 01-04 in order with papermill, one run folder.

Each notebook has one cell tagged `parameters`. A preset (`notebooks/presets/<name>.json`)
gives values per notebook; the runner adds `run_dir` (and `preset`) to every notebook so that
each one reads what the previous ones wrote there. Parameters are validated against what the
notebooks declare *before* anything executes.

Notebooks 01-03 are the steps `train`, `eval` and `profile` of the run folder (rt_lib.runs.record.STEPS).
Before anything executes, a notebook whose step already completed in the folder (or whose later
steps completed with its results) is refused unless `replace=True`; with it, the old results move
to `<run>/replaced/<step>-<time>/` and later steps that used them are marked stale
(rt_lib.runs.record.start_step). An interrupted step is resumed without `replace`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rt_lib import files
from rt_lib.runs.steps import PRESET_DIR, RENAMED_PARAMETERS

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = (
    "01_router_tuning",
    "02_evaluation",
    "03_speedup_profiling",
    "04_paper_tables_and_figures",
)
# The run-folder step each notebook writes (rt_lib.runs.record.STEPS); 04 only reads.
NOTEBOOK_STEPS = {"01_router_tuning": "train", "02_evaluation": "eval", "03_speedup_profiling": "profile"}

_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}


class ParameterError(ValueError):
    """A preset or command-line parameter that the notebooks do not declare, or of the wrong type."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, dict]:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ParameterError(f"unknown preset {name!r}; available presets: {available_presets()}")
    preset = json.loads(path.read_text())
    unknown = sorted(set(preset) - set(NOTEBOOKS) - {"description"})
    if unknown:
        raise ParameterError(f"preset {name!r} has sections {unknown}; sections are the notebook names {list(NOTEBOOKS)}")
    return preset


def declared_parameters(notebook: str) -> dict[str, dict]:
    """name -> {inferred_type_name, default, help} from the notebook's `parameters` cell."""
    import papermill

    return papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{notebook}.ipynb"))


_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def refuse_undeclared(namespace: dict, notebook: str) -> None:
    """Raise ``ParameterError`` if the notebook's namespace holds a parameter its `parameters` cell
    does not declare: papermill run by hand injects any name it is given with only a warning, and a
    misspelt parameter would silently run with the default. Called first in each notebook, before
    its own imports (names of modules, classes and functions are not parameters)."""
    import inspect
    import types

    declared = set(declared_parameters(notebook))
    unknown = sorted(k for k, v in namespace.items()
                     if k not in declared and not k.startswith("_") and k not in _KERNEL_NAMES
                     and not isinstance(v, types.ModuleType) and not inspect.isclass(v) and not callable(v)
                     and type(v).__module__ != "typing")
    if unknown:
        valid = ", ".join(sorted(declared))
        raise ParameterError(f"{notebook}: unknown parameter(s) {unknown}; this notebook declares: {valid}")


def _allowed_types(type_name: str) -> tuple[tuple[type, ...], bool] | None:
    """Python types a parameter annotation allows, and whether None is allowed.

    Notebooks annotate parameters (`lr: float = 1e-3`, `model: Optional[str] = None`); papermill
    reports the annotation text. None when the annotation is absent or not understood."""
    t = type_name.replace(" ", "")
    optional = False
    if t.startswith("Optional[") and t.endswith("]"):
        t, optional = t[len("Optional["):-1], True
    parts = t[len("Union["):-1].split(",") if t.startswith("Union[") and t.endswith("]") else [t]
    if "None" in parts:
        optional = True
        parts = [p for p in parts if p != "None"]
    allowed = []
    for p in parts:
        base = p.split("[")[0].lower()
        if base not in _TYPES:
            return None
        allowed.extend(_TYPES[base] if isinstance(_TYPES[base], tuple) else (_TYPES[base],))
    return tuple(allowed), optional


def _check_type(notebook, name, value, spec):
    allowed = _allowed_types(spec.get("inferred_type_name") or "None")
    if allowed is None:
        return
    types, optional = allowed
    if value is None and optional:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ParameterError(
            f"{notebook}: parameter {name!r} should be {spec.get('inferred_type_name')} "
            f"(default {spec.get('default')}), got {value!r}"
        )


def validate(parameters: dict[str, dict]) -> None:
    """Every (notebook, name) must be declared by that notebook, with a value of the declared type."""
    for nb, params in parameters.items():
        if nb not in NOTEBOOKS:
            raise ParameterError(f"unknown notebook {nb!r}; notebooks: {list(NOTEBOOKS)}")
        declared = declared_parameters(nb)
        for name, value in params.items():
            if name not in declared:
                valid = "\n  ".join(f"{k} ({v.get('inferred_type_name')}, default {v.get('default')}): {v.get('help')}"
                                    for k, v in declared.items())
                raise ParameterError(f"{nb}: unknown parameter {name!r}. Valid parameters:\n  {valid}")
            _check_type(nb, name, value, declared[name])


def _current_name(notebook: str, name: str) -> str:
    """``name`` under today's name (``RENAMED_PARAMETERS``); an old name prints a one-line note."""
    new = RENAMED_PARAMETERS.get(notebook, {}).get(name)
    if new is None:
        return name
    print(f"note: parameter {notebook}.{name} is deprecated, use {notebook}.{new}", file=sys.stderr)
    return new


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`notebook.name=value` or `name=value` (applied to every notebook that declares it).

    Values are JSON (numbers, true/false, lists, quoted strings); anything else is a string.
    A parameter's old name (``RENAMED_PARAMETERS``) still works, with a note on stderr."""
    out: dict[str, dict] = {}
    for item in items:
        if "=" not in item:
            raise ParameterError(f"override {item!r} is not of the form [notebook.]name=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." in key:
            nb, name = key.split(".", 1)
            nb = match_notebook(nb)
            out.setdefault(nb, {})[_current_name(nb, name)] = value
        else:
            targets = [nb for nb in NOTEBOOKS if key in declared_parameters(nb) or key in RENAMED_PARAMETERS.get(nb, {})]
            if not targets:
                raise ParameterError(f"no notebook declares a parameter {key!r}; see `--list-parameters`")
            for nb in targets:
                out.setdefault(nb, {})[_current_name(nb, key)] = value
    return out


def match_notebook(prefix: str) -> str:
    hits = [nb for nb in NOTEBOOKS if nb == prefix or nb.startswith(prefix)]
    if len(hits) != 1:
        raise ParameterError(f"{prefix!r} does not name one notebook of {list(NOTEBOOKS)}")
    return hits[0]


@dataclass
class NotebookFailure(RuntimeError):
    notebook: str
    cell: int | None
    error: str
    executed_copy: Path

    def __str__(self):
        where = f"cell {self.cell}" if self.cell is not None else "start-up"
        return (f"notebook {self.notebook} failed at {where}: {self.error}\n"
                f"the executed copy with the traceback is {self.executed_copy}; everything produced so far is kept")


def _step_inputs(notebook: str, parameters: dict) -> dict[str, Path]:
    """Files of earlier steps a notebook reads when they are not the run's own (rt_lib.runs.record.STEPS
    ``inputs``): an explicit ``routers`` folder (02/03; relative paths are relative to the kit root,
    where the notebooks run)."""
    routers = parameters.get("routers")
    if NOTEBOOK_STEPS.get(notebook) in ("eval", "profile") and routers:
        return {"routers": ROOT / routers / "routers.safetensors"}
    return {}


def check_run_folder(run_dir: str | Path, notebooks: list[str] | None = None, replace: bool = False) -> None:
    """Raise ``rt_lib.runs.record.ResultsExist`` when running ``notebooks`` into ``run_dir`` would replace
    results of completed steps and ``replace`` is False; nothing is changed. Called before anything
    executes (by ``run_pipeline`` and, for every run folder of a sweep, by rt_lib.cli.reproduce)."""
    from rt_lib.runs import record as runs
    from rt_lib.runs import steps as run_steps

    run_dir = Path(run_dir)
    if replace or not (run_dir / runs.RUN_FILE).exists():
        return
    record = runs.load_run(run_dir)
    selected = list(notebooks or NOTEBOOKS)
    blocking: dict[str, str] = {}
    for nb in selected:
        if nb in NOTEBOOK_STEPS:
            blocking.update(run_steps.replace_plan(run_dir, NOTEBOOK_STEPS[nb], record))
    if blocking:
        todo = [nb for nb in selected if nb not in NOTEBOOK_STEPS
                or run_steps.step_state(run_dir, record, NOTEBOOK_STEPS[nb])[0] != "completed"]
        hint = ("To continue an interrupted run instead, run only the notebooks not completed yet: "
                f"--notebooks {','.join(nb[:2] for nb in todo)}") if len(todo) < len(selected) and todo else ""
        raise run_steps.ResultsExist(run_dir, list(blocking.items()), hint)


def run_pipeline(preset: str, run_dir: str | Path, overrides: dict[str, dict] | None = None,
                 notebooks: list[str] | None = None, progress: bool = True, replace: bool = False) -> dict[str, float]:
    """Execute the notebooks in order; returns wall time per notebook (seconds).

    A notebook whose step (NOTEBOOK_STEPS) already completed in ``run_dir`` raises
    ``rt_lib.runs.record.ResultsExist`` before anything executes, unless ``replace``: then the old
    results are moved to ``<run_dir>/replaced/`` and later steps that used them marked stale
    (``rt_lib.runs.record.start_step``). An interrupted step resumes without ``replace``."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from rt_lib.runs import record as runs
    from rt_lib.runs import steps as run_steps

    params = {nb: dict(sec) for nb, sec in load_preset(preset).items() if nb in NOTEBOOKS}
    for nb, sec in (overrides or {}).items():
        params.setdefault(nb, {}).update(sec)
    validate(params)
    selected = list(notebooks or NOTEBOOKS)
    for nb in selected:
        if nb not in NOTEBOOKS:
            raise ParameterError(f"unknown notebook {nb!r}; notebooks: {list(NOTEBOOKS)}")
    run_dir = Path(run_dir).resolve()
    # held until this process ends: a second pipeline (or training) into the folder is refused,
    # while this one's notebook kernels work under the lock
    files.hold_folder(run_dir, f"pipeline {preset}")
    check_run_folder(run_dir, selected, replace)
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / runs.RUN_FILE).exists():
        runs.new_run(root=run_dir.parent, run_id=run_dir.name, preset=preset)
    times: dict[str, float] = {}
    for k, nb in enumerate(selected, 1):
        declared = declared_parameters(nb)
        p = dict(params.get(nb, {}))
        p.update({name: val for name, val in (("run_dir", str(run_dir)), ("preset", preset)) if name in declared})
        step = NOTEBOOK_STEPS.get(nb)
        if step:  # moves replaced / stale results aside, records the step as running with its inputs
            run_steps.start_step(run_dir, step, replace=replace, inputs=_step_inputs(nb, p))
        if step == "train" and "train_options" in declared and run_steps.has_checkpoints(run_dir):
            # an interrupted training (a replaced one was moved aside above) continues where it stopped
            p["train_options"] = {**(p.get("train_options") or {}), "resume_from": "latest"}
            print(f"[{k}/{len(selected)}] {nb}: continuing the interrupted training from its latest checkpoint")
        out_nb = out_dir / f"{nb}.ipynb"
        # papermill writes its output as it goes: into a temporary file that replaces the executed
        # copy only once complete, so a full disk or a kill never leaves a truncated notebook
        partial = out_dir / f".{nb}.ipynb.partial-{os.getpid()}"
        logger.info("[%d/%d] %s", k, len(selected), nb)
        print(f"[{k}/{len(selected)}] {nb} ...", flush=True)
        t0 = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(NOTEBOOK_DIR / f"{nb}.ipynb"), str(partial), parameters=p, kernel_name="python3",
                progress_bar=progress, cwd=str(ROOT),
            )
        except PapermillExecutionError as e:  # a complete notebook that shows the failing cell
            os.replace(partial, out_nb)
            raise NotebookFailure(nb, e.exec_count, f"{e.ename}: {e.evalue}", out_nb) from None  # cell = In [n]
        except Exception as e:  # kernel start-up, missing file, full disk, ...: the partial copy is not kept
            partial.unlink(missing_ok=True)
            raise NotebookFailure(nb, None, f"{type(e).__name__}: {e}", out_nb) from e
        os.replace(partial, out_nb)
        times[nb] = time.perf_counter() - t0
        print(f"[{k}/{len(selected)}] {nb} done in {times[nb]:.0f} s", flush=True)
        _record(run_dir, preset, nb, p, times[nb])
        if step:
            run_steps.finish_step(run_dir, step)
    return times


def _record(run_dir: Path, preset: str, notebook: str, parameters: dict, seconds: float) -> None:
    """Merge the notebook's parameters and wall time into run.json under steps.pipeline."""
    from rt_lib.runs import record as runs

    if not (run_dir / runs.RUN_FILE).exists():
        runs.new_run(root=run_dir.parent, run_id=run_dir.name, preset=preset)
    old = runs.load_run(run_dir).get("steps", {}).get("pipeline", {})
    notebooks = {**old.get("notebooks", {}),
                 notebook: {"parameters": parameters, "wall_time_s": round(seconds, 1),
                            "executed_copy": f"notebooks/{notebook}.ipynb"}}
    runs.update_run(run_dir, "pipeline", {"preset": preset, "notebooks": notebooks})
