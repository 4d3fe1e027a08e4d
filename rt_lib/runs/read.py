"""Reading run folders: ``results/runs/<id>/`` as the kit's steps left them.

``read_run`` reads one folder (run.json plus whichever result files it has, formats in
docs/results_format.md and ``rt_lib.runs.schema``) and refuses, with ``MalformedRun``, a folder
whose files cannot be read as documented, and, with ``StaleRun``, one whose results were
made from results since replaced (rt_lib.runs.record). ``load_runs`` reads every folder under a
results folder and names the ones it left out.

``setting`` is the one answer to "what configuration did this run's steps run with": every
step records its options in run.json ``parameters.<step>`` and training its resolved MindSkip
config in ``steps.train.config``; ``setting`` returns the first value of a key in those
sources (``schema.SETTING_SOURCES``, in that order). Older folders are read through ``upgrade``,
which moves their records to the same places. It takes a
``Run`` or a run folder path, so readers of single files (an evaluation loaded back, a sweep
table over training runs) ask the same question the same way.

    from rt_lib.runs.read import read_run, setting
    run = read_run("results/runs/cpu-main")
    run.model, run.granularity, run.threshold
    setting("results/runs/cpu-main", "reg_lambda")
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rt_lib.runs import schema

log = logging.getLogger(__name__)

# Columns each file must have, are read as numbers, must be fractions (rt_lib.runs.schema).
REQUIRED_COLUMNS = {path: schema.required_columns(path) for path in (k.path for k in schema.RUN_FILES)}
NUMERIC_COLUMNS = {path: schema.numeric_columns(path) for path in (k.path for k in schema.RUN_FILES)}
FRACTION_COLUMNS = {path: cols for path in (k.path for k in schema.RUN_FILES)
                    if (cols := schema.fraction_columns(path))}
FRACTION_METRICS = {"acc", "acc_norm", "paper"}  # "paper": rt_lib.evaluation.driver's macro average of them
# A step recorded in run.json promises its main file.
STEP_FILES = {"train": "train/summary.json", "eval": "eval/results.csv", "profile": "profile/profile.csv"}
OPTIONAL_FILES = ("eval/paired.csv", "eval/skip_stats.csv", "train/log.csv", "profile/profile.json")

STEP_ORDER = ("train", "eval", "profile", "pipeline")
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
    (run.json ``steps.<step>.stale``, or a recorded input file that changed; rt_lib.runs.record)."""


def model_name(model_id: Any) -> str:
    """Printable model name: organisation and ``.gguf`` dropped, known models spelled as the paper does."""
    if model_id is None or (isinstance(model_id, float) and math.isnan(model_id)):
        return "unknown model"
    base = re.sub(r"\.gguf$", "", str(model_id).rstrip("/").split("/")[-1])
    return MODEL_NAMES.get(base.lower(), base)


# ---------------------------------------------------------------------------- configuration lookup
def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def mindskip_config(meta: dict) -> dict:
    """The run's MindSkip config: the first source of ``schema.SETTING_SOURCES`` (``{}`` when none).
    ``meta``: run.json as ``upgrade`` returns it."""
    for cfg in (_dict(_dict(meta.get("steps")).get("train")).get("config"),
                _dict(_dict(meta.get("parameters")).get("eval")).get("mindskip")):
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def lookup(meta: dict, *keys: str) -> Any:
    """First value of any of ``keys`` in ``schema.SETTING_SOURCES`` order, given run.json (``meta``, as
    ``upgrade`` returns it); None when no source has one. Within one source, earlier keys win."""
    params = _dict(meta.get("parameters"))
    steps = [*(s for s in STEP_ORDER if s in params), *(s for s in params if s not in STEP_ORDER)]
    for source in (mindskip_config(meta), *(params[s] for s in steps)):
        for key in keys:
            if isinstance(source, dict) and source.get(key) not in (None, ""):
                return source[key]
    return None


# Where older run folders recorded a step's options in ``steps.<step>``; moved on reading.
LEGACY_STEP_KEYS = {
    "eval": ("preset", "tasks", "model", "limits", "batch_size", "seed"),
    "profile": ("preset", "model"),
}


def upgrade(meta: dict, files: dict, read_eval: Callable[[], Any] | None = None) -> dict:
    """run.json in the current layout (a new dict; the file is not changed).

    Older folders kept options elsewhere: the training options in train/summary.json
    ``train_config``, the resolved MindSkip config in train/summary.json ``config``, options as
    top-level ``parameters`` values, an evaluation's options in ``steps.eval`` and
    eval/results.json ``provenance``, the profile grid in ``steps.profile.settings``. Each moves
    to where the current layout keeps it, never replacing what the file records there. Options
    recorded under an older name (``schema.RENAMED_FIELDS``: the recipe, task set and grid were
    each called ``preset``) get today's name.
    ``read_eval()`` returns eval/results.json; it is called only for an evaluation that nothing
    else names the model or routers of (the file holds every per-document score: large)."""
    meta = json.loads(json.dumps(meta))
    params = meta.setdefault("parameters", {})
    if not isinstance(params, dict):
        raise MalformedRun("run.json: parameters is not an object")
    for key in [k for k, v in params.items() if not isinstance(v, dict)]:
        params.setdefault("pipeline", {}).setdefault(key, params.pop(key))
    steps = meta.setdefault("steps", {})
    if not isinstance(steps, dict):
        raise MalformedRun("run.json: steps is not an object")
    summary = _dict(files.get("train/summary.json"))
    if summary.get("train_config"):
        params["train"] = {**_dict(summary["train_config"]), **_dict(params.get("train"))}
    if isinstance(summary.get("config"), dict):
        train = steps.setdefault("train", {})
        if isinstance(train, dict) and not train.get("config"):
            train["config"] = summary["config"]
    for step, keys in LEGACY_STEP_KEYS.items():
        old = _dict(steps.get(step))
        moved = {k: old[k] for k in keys if old.get(k) not in (None, "")}
        moved.update(_dict(old.get("settings")))
        if moved:
            params[step] = {**moved, **_dict(params.get(step))}
    if read_eval is not None and (lookup(meta, *MODEL_KEYS) is None or not mindskip_config(meta)):
        prov = _dict(_dict(read_eval()).get("provenance"))
        found = {"model": prov.get("model"), "model_dtype": prov.get("model_dtype"),
                 "task_set": prov.get("task_set") or prov.get("preset"),
                 **_dict(prov.get("parameters")), "mindskip": _dict(prov.get("mindskip")).get("config")}
        found = {k: v for k, v in found.items() if v not in (None, "", {})}
        if found:
            params["eval"] = {**found, **_dict(params.get("eval"))}
    for step, renamed in schema.RENAMED_FIELDS.items():  # options recorded under their old names
        options = params.get(step)
        for old, new in renamed.items():
            if isinstance(options, dict) and old in options:
                value = options.pop(old)
                options.setdefault(new, value)
    return meta


def _read_lenient(path: Path) -> Run:
    """A run folder read for its settings only: run.json and train/summary.json, no checks."""
    meta = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    files: dict[str, Any] = {}
    if (path / "train" / "summary.json").is_file():
        files["train/summary.json"] = _read_json(path / "train" / "summary.json")
    results = path / "eval" / "results.json"
    meta = upgrade(_dict(meta), files, (lambda: _read_json(results)) if results.is_file() else None)
    return Run(run_id=str(meta.get("run_id") or path.name), path=path, meta=meta, files=files)


def setting(run: Run | str | Path, *keys: str, default: Any = None) -> Any:
    """What a run's steps ran with: the first value of any of ``keys`` (e.g. ``"threshold"``,
    ``"model", "model_id"``) in the sources of ``schema.SETTING_SOURCES``, in that order.

    ``run`` is a ``Run`` or a run folder; a folder is read leniently (run.json,
    train/summary.json, eval/results.json when needed; no staleness or column checks).
    """
    run = run if isinstance(run, Run) else _read_lenient(Path(run))
    found = run.lookup(*keys)
    return default if found is None else found


# ---------------------------------------------------------------------------- skip ratios
# eval/results.csv ``skip_ratio`` is the paper's skip ratio: skipped sublayer executions / all layers'
# executions, i.e. the mean number of layers skipped per sequence (token routing: per token) over the
# model's layers, for MindSkip (counted by its gates) and static drop (k / layers) alike. Evaluations
# record ``skip_ratio_of`` (this value) and ``num_layers`` in results.json ``provenance`` and run.json
# ``parameters.eval``. Files without them were written when it was the fraction of the *routed*
# layers' executions (static drop: k / routed layers); they are converted on reading.
SKIP_RATIO_OF = "all layers"


def skip_ratio_of_all_layers(table: pd.DataFrame, written_of: Any, num_layers: int | None,
                             n_routed: int | None, source: str = "") -> pd.DataFrame:
    """results.csv rows with ``skip_ratio`` of all layers (a new frame).

    ``written_of``: the file's recorded ``skip_ratio_of``; None for a file written before it was
    recorded, whose ratios are of the routed layers: each becomes ratio x ``n_routed`` /
    ``num_layers``, a static drop's ``k`` / ``num_layers`` where ``k`` is known. A ratio that
    cannot be converted (layer counts unknown) becomes NaN, with a warning naming ``source``;
    never a number in the other unit."""
    if written_of == SKIP_RATIO_OF or "skip_ratio" not in table:
        return table
    if written_of is not None:
        raise MalformedRun(f"{source or 'eval/results.csv'}: skip_ratio_of {written_of!r} is not "
                           f"{SKIP_RATIO_OF!r}, the only unit the kit writes")
    t = table.copy()
    ratio = pd.to_numeric(t["skip_ratio"], errors="coerce").astype(float)
    label = (t["method"].where(t["method"].notna(), t["variant"]) if "method" in t else t["variant"]).astype(str)
    drop = label.str.startswith("static_drop")
    k = pd.to_numeric(t["k"], errors="coerce").astype(float) if "k" in t else pd.Series(np.nan, index=t.index)
    from_label = pd.to_numeric(t["variant"].astype(str).str.extract(r"^static_drop_k(\d+)$", expand=False),
                               errors="coerce")
    k = k.fillna(from_label.astype(float))
    out = ratio * (n_routed / num_layers) if num_layers and n_routed else pd.Series(np.nan, index=t.index)
    if num_layers:
        known = drop & k.notna()
        out[known] = k[known] / num_layers
    lost = ratio.notna() & out.isna()
    if lost.any():
        log.warning("%s: skip ratios written as fractions of the routed layers cannot be given as fractions of "
                    "all layers (%s unknown): left empty", source or "eval/results.csv",
                    "the model's layer count" if not num_layers else "the routed layer count")
    t["skip_ratio"] = out.where(ratio.notna() | (drop & out.notna()))
    return t


def routers_num_layers(run_dir: Path, meta: dict) -> int | None:
    """The model's layer count of a run: run.json (``num_layers``, recorded by evaluations), else
    the ``mindskip_config.json`` of the routers the run tuned or evaluated (its ``train/routers``, the
    evidence plan's routers, a pipeline override's ``routers``); None when none says."""
    found = lookup(meta, "num_layers")
    if found is not None:
        return int(found)
    candidates = [run_dir / "train" / "routers"]
    plan = run_dir / "evidence" / "plan.json"
    if plan.is_file():
        candidates.append(Path(str(_dict(_read_json(plan)).get("routers", ""))))
    overrides = _dict(_dict(_dict(meta.get("parameters")).get("pipeline")).get("overrides"))
    candidates += [Path(str(o["routers"])) for o in overrides.values() if isinstance(o, dict) and o.get("routers")]
    routers = lookup(meta, "routers")
    if isinstance(routers, str):
        candidates.append(Path(routers))
    kit_root = run_dir.resolve().parents[2] if len(run_dir.resolve().parents) > 2 else run_dir
    for c in candidates:
        for folder in (c, kit_root / c):
            cfg = folder / "mindskip_config.json"
            if str(c) and cfg.is_file():
                layers = _dict(_read_json(cfg)).get("num_layers")
                if layers:
                    return int(layers)
    return None


def _routed_count(meta: dict) -> int | None:
    cfg = mindskip_config(meta)
    n = len(cfg.get("routed_layers") or []) or cfg.get("num_routed_layers")
    return int(n) if n else None


# ---------------------------------------------------------------------------- one run folder
@dataclass
class Run:
    """One readable run folder: run.json plus whichever result files it has."""

    run_id: str
    path: Path
    meta: dict  # run.json in the current layout (``upgrade``)
    files: dict[str, Any] = field(default_factory=dict)  # relative path -> DataFrame or dict

    @property
    def config(self) -> dict:
        """The MindSkip config (first source of ``schema.SETTING_SOURCES``)."""
        return mindskip_config(self.meta)

    def lookup(self, *keys: str) -> Any:
        """First value of ``keys`` in ``schema.SETTING_SOURCES`` order; None when none has one."""
        return lookup(self.meta, *keys)

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
    """Each step's state (rt_lib.runs.record.step_state); ``StaleRun`` naming the refresh command
    when one is stale."""
    from rt_lib.runs import steps as run_steps

    steps = meta.get("steps") or {}
    if not isinstance(steps, dict):
        raise MalformedRun("run.json: steps is not an object")
    if any(not isinstance(steps.get(s, {}), dict) for s in run_steps.STEPS):
        raise MalformedRun("run.json: a step entry is not an object")
    states = {s: run_steps.step_state(path, meta, s) for s in run_steps.STEPS}
    stale = {s: why for s, (state, why) in states.items() if state == "stale"}
    if stale:
        raise StaleRun("stale results, not used: " + "; ".join(f"{s} ({why})" for s, why in stale.items())
                       + f". Refresh them with: {run_steps.refresh_command(path, stale, meta)}")
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

    def read_eval() -> dict:
        obj = _read_json(results_json)
        if not isinstance(obj, dict):
            raise MalformedRun("eval/results.json: not a JSON object")
        run.files["eval/results.json"] = obj
        return obj

    run.meta = upgrade(meta, run.files, read_eval if results_json.is_file() else None)
    if "eval/results.csv" in run.files:  # skip ratios of all layers, whenever the file was written
        written_of = lookup(run.meta, "skip_ratio_of")
        legacy = written_of is None
        run.files["eval/results.csv"] = skip_ratio_of_all_layers(
            run.files["eval/results.csv"], written_of, routers_num_layers(path, run.meta) if legacy else None,
            _routed_count(run.meta) if legacy else None, f"{path.name}/eval/results.csv")
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
        if not (path / "run.json").exists() and (path / "frontier" / "plan.json").exists():
            continue  # a frontier study (rt_lib.evidence.frontier), not a pipeline run: tabled on its own
        try:
            runs.append(read_run(path))
        except MalformedRun as exc:
            msg = f"{path.name}: {exc}"
            log.warning("left out run folder %s", msg)
            problems.append(msg)
    return runs, problems
