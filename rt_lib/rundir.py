"""Reading run folders: ``results/runs/<id>/`` as the kit's steps left them.

``read_run`` reads one folder (run.json plus whichever result files it has, formats in
docs/results_format.md and ``rt_lib.schema``) and refuses, with ``MalformedRun``, a folder
whose files cannot be read as documented, and, with ``StaleRun``, one whose results were
made from results since replaced (rt_lib.runs). ``load_runs`` reads every folder under a
results folder and names the ones it left out.

``setting`` is the one answer to "what configuration did this run's steps run with": the
first value of a key in the sources listed in ``SETTING_SOURCES``, in that order. It takes a
``Run`` or a run folder path, so readers of single files (an evaluation loaded back, a sweep
table over training runs) ask the same question the same way.

    from rt_lib.rundir import read_run, setting
    run = read_run("results/runs/cpu-main")
    run.model, run.granularity, run.threshold
    setting("results/runs/cpu-main", "reg_lambda")
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rt_lib import schema

log = logging.getLogger(__name__)

# Columns each file must have, are read as numbers, must be fractions (rt_lib.schema).
REQUIRED_COLUMNS = {path: schema.required_columns(path) for path in (k.path for k in schema.RUN_FILES)}
NUMERIC_COLUMNS = {path: schema.numeric_columns(path) for path in (k.path for k in schema.RUN_FILES)}
FRACTION_COLUMNS = {path: cols for path in (k.path for k in schema.RUN_FILES)
                    if (cols := schema.fraction_columns(path))}
FRACTION_METRICS = {"acc", "acc_norm", "paper"}  # "paper": rt_lib.evaluation's macro average of them
# A step recorded in run.json promises its main file.
STEP_FILES = {"train": "train/summary.json", "eval": "eval/results.csv", "profile": "profile/profile.csv"}
OPTIONAL_FILES = ("eval/paired.csv", "eval/skip_stats.csv", "train/log.csv", "profile/profile.json")

# Where ``setting`` looks, in order; the first source holding the key (with a value other than
# None or "") answers.
SETTING_SOURCES = (
    ("the MindSkip config: run.json `steps.train.config`, else train/summary.json `config`, else "
     "eval/results.json `provenance.mindskip.config`"),
    "train/summary.json `train_config` (every training option)",
    "run.json `parameters` (what the steps were called with)",
    "each object inside run.json `parameters` (`parameters.train`, `parameters.eval`, ...)",
    "each run.json `steps.<step>` entry",
    "eval/results.json `provenance` (read only when run.json records no model or no MindSkip config)",
)
MODEL_KEYS = ("model", "model_name", "model_id", "base_model")
DATA_KEYS = ("dataset", "data", "train_data")

# Model ids/names (lower case, organisation stripped) -> the name printed in tables. The
# paper's own models map onto the paper's spelling so that kit rows can be compared with them.
MODEL_NAMES = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct",
    "smollm2-135m": "SmolLM2-135M",
    "meta-llama-3-8b": "Llama-3-8B", "llama-3-8b": "Llama-3-8B",
    "meta-llama-3-8b-instruct": "Llama-3-8B-Instruct", "llama-3-8b-instruct": "Llama-3-8B-Instruct",
    "mistral-7b-v0.3": "Mistral-7B", "mistral-7b": "Mistral-7B",
    "qwen2.5-7b": "Qwen2.5-7B",
}


class MalformedRun(Exception):
    """A run folder whose files cannot be read as documented."""


class StaleRun(MalformedRun):
    """A run folder with a stale step: its results were made from results since replaced
    (run.json ``steps.<step>.stale``, or a recorded input file that changed; rt_lib.runs)."""


def model_name(model_id: Any) -> str:
    """Printable model name: organisation and ``.gguf`` dropped, known models spelled as the paper does."""
    if model_id is None or (isinstance(model_id, float) and math.isnan(model_id)):
        return "unknown model"
    base = re.sub(r"\.gguf$", "", str(model_id).rstrip("/").split("/")[-1])
    return MODEL_NAMES.get(base.lower(), base)


# ---------------------------------------------------------------------------- configuration lookup
def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def mindskip_config(meta: dict, files: dict) -> dict:
    """The run's MindSkip config: the first source of ``SETTING_SOURCES`` (``{}`` when none)."""
    steps = _dict(meta.get("steps"))
    provenance = _dict(_dict(files.get("eval/results.json")).get("provenance"))
    for cfg in (_dict(steps.get("train")).get("config"), _dict(files.get("train/summary.json")).get("config"),
                _dict(provenance.get("mindskip")).get("config")):
        if isinstance(cfg, dict):
            return cfg
    return {}


def lookup(meta: dict, files: dict, *keys: str) -> Any:
    """First value of any of ``keys`` in ``SETTING_SOURCES`` order, given run.json (``meta``)
    and the files read so far (``{relative path: parsed JSON}``); None when no source has one.
    Within one source, earlier keys win."""
    params = _dict(meta.get("parameters"))
    summary = _dict(files.get("train/summary.json"))
    sources = [mindskip_config(meta, files), summary.get("train_config"), params,
               *(v for v in params.values() if isinstance(v, dict)),
               *_dict(meta.get("steps")).values(),
               _dict(_dict(files.get("eval/results.json")).get("provenance"))]
    for source in sources:
        for key in keys:
            if isinstance(source, dict) and source.get(key) not in (None, ""):
                return source[key]
    return None


def _needs_eval_provenance(meta: dict, files: dict) -> bool:
    """eval/results.json holds every per-document score (large): it is read only for the model
    name or router config that an evaluation-only run records nowhere else."""
    return lookup(meta, files, "model", "model_name", "model_id") is None or not mindskip_config(meta, files)


def setting(run: Run | str | Path, *keys: str, default: Any = None) -> Any:
    """What a run's steps ran with: the first value of any of ``keys`` (e.g. ``"threshold"``,
    ``"model", "model_id"``) in the sources of ``SETTING_SOURCES``, in that order.

    ``run`` is a ``Run`` or a run folder; a folder is read leniently (run.json,
    train/summary.json, eval/results.json when needed; no staleness or column checks).
    """
    if not isinstance(run, Run):
        path = Path(run)
        meta = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
        files: dict[str, Any] = {}
        if (path / "train" / "summary.json").is_file():
            files["train/summary.json"] = _read_json(path / "train" / "summary.json")
        if (path / "eval" / "results.json").is_file() and _needs_eval_provenance(_dict(meta), files):
            files["eval/results.json"] = _read_json(path / "eval" / "results.json")
        found = lookup(_dict(meta), files, *keys)
    else:
        found = run.lookup(*keys)
    return default if found is None else found


# ---------------------------------------------------------------------------- one run folder
@dataclass
class Run:
    """One readable run folder: run.json plus whichever result files it has."""

    run_id: str
    path: Path
    meta: dict
    files: dict[str, Any] = field(default_factory=dict)  # relative path -> DataFrame or dict

    @property
    def config(self) -> dict:
        """The MindSkip config (first source of ``SETTING_SOURCES``)."""
        return mindskip_config(self.meta, self.files)

    def lookup(self, *keys: str) -> Any:
        """First value of ``keys`` in ``SETTING_SOURCES`` order; None when none has one."""
        return lookup(self.meta, self.files, *keys)

    @property
    def model(self) -> str:
        found = self.lookup(*MODEL_KEYS)
        if isinstance(found, dict):
            found = found.get("name") or found.get("id")
        return model_name(found)

    @property
    def dataset(self) -> str | None:
        found = self.lookup(*DATA_KEYS)
        if isinstance(found, dict):
            found = found.get("name")
        return None if found is None else str(found)

    @property
    def granularity(self) -> str | None:
        return self.lookup("granularity")

    @property
    def route_level(self) -> str | None:
        return self.lookup("route_level")

    @property
    def threshold(self) -> float:
        found = self.lookup("threshold")
        return 0.5 if found is None else float(found)

    @property
    def trainable(self) -> str:
        """What was tuned besides nothing: ``routers`` (Router-Tuning), ``lora`` or ``full``."""
        return str(self.lookup("trainable") or "routers")

    @property
    def capacity_target(self) -> float | None:
        found = self.lookup("capacity_target")
        return None if found is None else float(found)

    @property
    def created(self) -> str:
        return str(self.meta.get("created") or "")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise MalformedRun(f"{path.name}: invalid JSON ({exc.msg}, line {exc.lineno})") from None


def _read_table(path: Path, rel: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MalformedRun(f"{rel}: unreadable CSV ({str(exc).strip().splitlines()[-1]})") from None
    missing = [c for c in REQUIRED_COLUMNS[rel] if c not in df.columns]
    if missing:
        raise MalformedRun(f"{rel}: missing columns {', '.join(missing)}")
    for col in NUMERIC_COLUMNS.get(rel, []):
        if col not in df:
            continue
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna()
        if bad.any():
            raise MalformedRun(f"{rel}: column {col} has non-numeric values (row {int(np.flatnonzero(bad)[0]) + 2})")
        df[col] = num.astype(float)
    for col in FRACTION_COLUMNS.get(rel, []):
        out = (df[col] < 0) | (df[col] > 1)
        if col == "value":  # accuracies only: another metric (e.g. a perplexity) may exceed 1
            out &= df["metric"].isin(FRACTION_METRICS)
        if out.any():
            raise MalformedRun(f"{rel}: column {col} outside [0, 1] (row {int(np.flatnonzero(out)[0]) + 2}); "
                               "results are fractions, not percent")
    return df


def _check_steps(path: Path, meta: dict) -> dict[str, tuple[str, str | None]]:
    """Each step's state (rt_lib.runs.step_state); ``StaleRun`` naming the refresh command
    when one is stale."""
    from rt_lib import pipeline
    from rt_lib import runs as runs_mod

    steps = meta.get("steps") or {}
    if not isinstance(steps, dict):
        raise MalformedRun("run.json: steps is not an object")
    if any(not isinstance(steps.get(s, {}), dict) for s in runs_mod.STEPS):
        raise MalformedRun("run.json: a step entry is not an object")
    states = {s: runs_mod.step_state(path, meta, s) for s in runs_mod.STEPS}
    stale = {s: why for s, (state, why) in states.items() if state == "stale"}
    if stale:
        raise StaleRun("stale results, not used: " + "; ".join(f"{s} ({why})" for s, why in stale.items())
                       + f". Refresh them with: {pipeline.refresh_command(path, stale, meta)}")
    return states


def read_run(path: str | Path) -> Run:
    """Read one run folder; raise ``MalformedRun`` naming the first missing or malformed file
    (``StaleRun`` for stale results)."""
    path = Path(path)
    if not (path / "run.json").is_file():
        raise MalformedRun("run.json missing")
    meta = _read_json(path / "run.json")
    if not isinstance(meta, dict):
        raise MalformedRun("run.json: not a JSON object")
    run = Run(run_id=str(meta.get("run_id") or path.name), path=path, meta=meta)
    states = _check_steps(path, meta)
    # a step recorded as completed promises its main file; an interrupted one may have none yet
    wanted = [STEP_FILES[s] for s in STEP_FILES if states[s][0] == "completed"]
    for rel in STEP_FILES.values():
        if rel not in wanted and (path / rel).is_file():
            wanted.append(rel)  # written, though run.json does not record the step
    for rel in wanted:
        if not (path / rel).is_file():
            raise MalformedRun(f"{rel} missing (run.json records the step)")
    for rel in [*wanted, *OPTIONAL_FILES]:
        if not (path / rel).is_file():
            continue
        if rel.endswith(".json"):
            obj = _read_json(path / rel)
            if not isinstance(obj, dict):
                raise MalformedRun(f"{rel}: not a JSON object")
            run.files[rel] = obj
        else:
            run.files[rel] = _read_table(path / rel, rel)
    results_json = path / "eval" / "results.json"
    if results_json.is_file() and _needs_eval_provenance(run.meta, run.files):
        obj = _read_json(results_json)
        if not isinstance(obj, dict):
            raise MalformedRun("eval/results.json: not a JSON object")
        run.files["eval/results.json"] = obj
    return run


def runs_dir(root: str | Path) -> Path:
    """The folder holding the run folders: ``<root>/runs`` when it exists, else ``root``."""
    root = Path(root)
    return root / "runs" if (root / "runs").is_dir() else root


def load_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """All readable run folders under ``root`` (a results folder holding ``runs/``, or the
    runs folder itself) and one problem line per folder left out."""
    folder = runs_dir(root)
    runs, problems = [], []
    if not folder.is_dir():
        return runs, problems
    for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            runs.append(read_run(path))
        except MalformedRun as exc:
            msg = f"{path.name}: {exc}"
            log.warning("left out run folder %s", msg)
            problems.append(msg)
    return runs, problems
