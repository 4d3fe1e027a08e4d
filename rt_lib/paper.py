"""The paper's tables and figures, rebuilt from result files, with the kit's runs beside them.

Reads only files: the paper's published numbers in ``results/reference/`` and the run
folders ``results/runs/<id>/`` (formats in docs/results_format.md). Writes tables as
Markdown, CSV and LaTeX and figures as PNG and PDF. Nothing here runs a model.

    python -m rt_lib.paper --results results

    from rt_lib.paper import collect_runs, build_all
    runs = collect_runs("results")        # one tidy row per (run, variant, threshold, task, metric)
    written = build_all("results")        # {"tables": {...}, "figures": {...}, "problems": [...]}

Which run provides which row is decided by ``collect_runs`` (see its docstring). A cell the
kit never measured shows "not run", never a value borrowed from elsewhere. A run folder with
a missing or malformed file, or with stale results (a step rerun with ``--replace`` after later
steps used its results; rt_lib.runs), is named in a warning and in ``problems`` (a stale one
with the command that refreshes it) and left out; every other run still builds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

NOT_RUN = "not run"
REFERENCE_NAMES = ("main_table", "lora_table", "data_ablation", "drop_vs_mindskip")
# The checkout's results/reference/ (an installed package has none: then ./results/reference).
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"
if not DEFAULT_REFERENCE_DIR.is_dir() and (Path.cwd() / "results" / "reference").is_dir():
    DEFAULT_REFERENCE_DIR = Path.cwd() / "results" / "reference"

# lm-evaluation-harness task names -> the paper's column names.
TASK_ALIASES = {
    "arc_challenge": "arc_c", "arc-challenge": "arc_c", "arc_c": "arc_c",
    "openbookqa": "obqa", "obqa": "obqa",
    "boolq": "boolq", "hellaswag": "hellaswag", "mmlu": "mmlu", "piqa": "piqa", "rte": "rte",
    "winogrande": "winogrande",
}
# The metric the paper reports per task (ROUTER_TUNING.md, evaluation settings).
PAPER_METRIC = {
    "arc_c": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm", "mmlu": "acc",
    "obqa": "acc_norm", "piqa": "acc_norm", "rte": "acc", "winogrande": "acc",
}
# Rows of eval/results.csv that are summaries, not tasks (rt_lib.evaluation's macro average):
# tables and figures average the tasks themselves.
NOT_TASKS = {"macro_avg"}
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
# eval/results.csv variant -> the paper's method name.
VARIANT_METHODS = {
    "dense": "baseline",
    "mindskip": "router-tuning",
    "static_drop": "attention-drop",
    "lora": "lora",
    "lora+mindskip": "lora+router-tuning",
}

# Columns each file must have (docs/results_format.md); `threshold` is optional in the
# files that only gained it for threshold sweeps.
REQUIRED_COLUMNS = {
    "eval/results.csv": ["variant", "task", "metric", "value", "stderr", "n", "num_fewshot", "threshold", "skip_ratio"],
    "eval/paired.csv": ["variant", "task", "metric", "diff", "ci_low", "ci_high", "n", "confidence"],
    "eval/skip_stats.csv": ["variant", "task", "layer", "executed_fraction"],
    "profile/profile.csv": ["regime", "variant", "batch_size", "seq_len", "new_tokens", "median_ms", "p10_ms",
                            "p90_ms", "tokens_per_s", "skip_ratio", "kv_bytes", "speedup", "bound_speedup",
                            "status", "reason"],
    "train/log.csv": ["step", "loss", "lm_loss", "reg_loss", "lr", "mean_capacity"],
}
NUMERIC_COLUMNS = {
    "eval/results.csv": ["value", "stderr", "threshold", "skip_ratio"],
    "eval/paired.csv": ["diff", "ci_low", "ci_high", "threshold"],
    "eval/skip_stats.csv": ["layer", "executed_fraction", "threshold"],
    "profile/profile.csv": ["skip_ratio", "speedup", "bound_speedup", "threshold"],
    "train/log.csv": ["step", "loss", "lm_loss", "reg_loss", "mean_capacity"],
}
FRACTION_METRICS = {"acc", "acc_norm", "paper"}  # "paper": rt_lib.evaluation's macro average of them
FRACTION_COLUMNS = {  # fractions in [0, 1]: a percent written by mistake must not pass silently
    "eval/results.csv": ["value", "skip_ratio"],
    "eval/skip_stats.csv": ["executed_fraction"],
    "profile/profile.csv": ["skip_ratio"],
}
# A step recorded in run.json promises its main file.
STEP_FILES = {"train": "train/summary.json", "eval": "eval/results.csv", "profile": "profile/profile.csv"}
OPTIONAL_FILES = ("eval/paired.csv", "eval/skip_stats.csv", "train/log.csv", "profile/profile.json")


class MalformedRun(Exception):
    """A run folder whose files cannot be read as documented."""


class StaleRun(MalformedRun):
    """A run folder with a stale step: its results were made from results since replaced
    (run.json ``steps.<step>.stale``, or a recorded input file that changed; rt_lib.runs)."""


# ---------------------------------------------------------------------------- names
def paper_task(name: str) -> str:
    """Task name as the paper's tables spell it (``arc_challenge``, ``arc_challenge_offline``
    -> ``arc_c``); others unchanged."""
    key = str(name).strip().lower().removesuffix("_offline")
    return TASK_ALIASES.get(key, str(name))


def model_name(model_id: Any) -> str:
    """Printable model name: organisation and ``.gguf`` dropped, known models spelled as the paper does."""
    if model_id is None or (isinstance(model_id, float) and math.isnan(model_id)):
        return "unknown model"
    base = re.sub(r"\.gguf$", "", str(model_id).rstrip("/").split("/")[-1])
    return MODEL_NAMES.get(base.lower(), base)


def variant_method(variant: str) -> str:
    """The paper's method name for an eval variant label (labels may carry suffixes, e.g. ``static_drop_k4``)."""
    v = str(variant).strip().lower()
    if v in VARIANT_METHODS:
        return VARIANT_METHODS[v]
    if v.startswith("lora") and "mindskip" in v:
        return "lora+router-tuning"
    for prefix in ("static_drop", "mindskip", "lora", "dense"):
        if v.startswith(prefix):
            return VARIANT_METHODS[prefix]
    return str(variant)


# ---------------------------------------------------------------------------- reference data
def load_reference(name: str, reference_dir: str | Path | None = None) -> pd.DataFrame:
    """One of the paper's tables (``main_table``, ``lora_table``, ``data_ablation``,
    ``drop_vs_mindskip``) from ``results/reference/<name>.csv``, source comment lines skipped."""
    if name not in REFERENCE_NAMES:
        raise ValueError(f"unknown reference table {name!r}; known: {', '.join(REFERENCE_NAMES)}")
    path = Path(reference_dir or DEFAULT_REFERENCE_DIR) / f"{name}.csv"
    return pd.read_csv(path, comment="#")


def reference_source(name: str, reference_dir: str | Path | None = None) -> list[str]:
    """The ``#`` source lines at the top of a reference CSV, without the ``#``."""
    path = Path(reference_dir or DEFAULT_REFERENCE_DIR) / f"{name}.csv"
    return [line[1:].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def _task_columns(ref: pd.DataFrame) -> list[str]:
    skip = {"model", "method", "granularity", "route_level", "speedup", "avg", "data"}
    return [c for c in ref.columns if c not in skip]


# ---------------------------------------------------------------------------- run folders
@dataclass
class Run:
    """One readable run folder: run.json plus whichever result files it has."""

    run_id: str
    path: Path
    meta: dict
    files: dict[str, Any] = field(default_factory=dict)  # relative path -> DataFrame or dict

    @property
    def config(self) -> dict:
        """The MindSkip config: run.json ``steps.train.config``, else train/summary.json
        ``config``, else the routers' config recorded by the evaluation (eval/results.json)."""
        steps = self.meta.get("steps") or {}
        evaluated = ((self._eval_provenance.get("mindskip") or {}).get("config"))
        for cfg in ((steps.get("train") or {}).get("config"), (self.files.get("train/summary.json") or {}).get("config"),
                    evaluated):
            if isinstance(cfg, dict):
                return cfg
        return {}

    @property
    def _eval_provenance(self) -> dict:
        prov = (self.files.get("eval/results.json") or {}).get("provenance")
        return prov if isinstance(prov, dict) else {}

    def _lookup(self, *keys: str) -> Any:
        """First value of ``keys`` in: the MindSkip config, train/summary.json ``train_config``,
        run.json ``parameters``, each dict inside ``parameters`` (``parameters.train`` as
        rt_lib.train writes it), each ``steps.<step>`` entry, the provenance in
        eval/results.json (read only when run.json lacks the model or the config)."""
        params = self.meta.get("parameters") or {}
        summary = self.files.get("train/summary.json") or {}
        sources = [self.config, summary.get("train_config"), params,
                   *(v for v in params.values() if isinstance(v, dict)),
                   *(self.meta.get("steps") or {}).values(), self._eval_provenance]
        for source in sources:
            for key in keys:
                if isinstance(source, dict) and source.get(key) not in (None, ""):
                    return source[key]
        return None

    @property
    def model(self) -> str:
        found = self._lookup("model", "model_name", "model_id", "base_model")
        if isinstance(found, dict):
            found = found.get("name") or found.get("id")
        return model_name(found)

    @property
    def dataset(self) -> str | None:
        found = self._lookup("dataset", "data", "train_data")
        if isinstance(found, dict):
            found = found.get("name")
        return None if found is None else str(found)

    @property
    def granularity(self) -> str | None:
        return self._lookup("granularity")

    @property
    def route_level(self) -> str | None:
        return self._lookup("route_level")

    @property
    def threshold(self) -> float:
        found = self._lookup("threshold")
        return 0.5 if found is None else float(found)

    @property
    def trainable(self) -> str:
        """What was tuned besides nothing: ``routers`` (Router-Tuning), ``lora`` or ``full``."""
        return str(self._lookup("trainable") or "routers")

    @property
    def capacity_target(self) -> float | None:
        found = self._lookup("capacity_target")
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


def read_run(path: str | Path) -> Run:
    """Read one run folder; raise ``MalformedRun`` naming the first missing or malformed file."""
    path = Path(path)
    if not (path / "run.json").is_file():
        raise MalformedRun("run.json missing")
    meta = _read_json(path / "run.json")
    if not isinstance(meta, dict):
        raise MalformedRun("run.json: not a JSON object")
    run = Run(run_id=str(meta.get("run_id") or path.name), path=path, meta=meta)
    steps = meta.get("steps") or {}
    if not isinstance(steps, dict):
        raise MalformedRun("run.json: steps is not an object")
    from rt_lib import pipeline
    from rt_lib import runs as runs_mod

    if any(not isinstance(steps.get(s, {}), dict) for s in runs_mod.STEPS):
        raise MalformedRun("run.json: a step entry is not an object")
    states = {s: runs_mod.step_state(path, meta, s) for s in runs_mod.STEPS}
    stale = {s: why for s, (state, why) in states.items() if state == "stale"}
    if stale:
        raise StaleRun("stale results, not used: " + "; ".join(f"{s} ({why})" for s, why in stale.items())
                       + f". Refresh them with: {pipeline.refresh_command(path, stale, meta)}")
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
    # eval/results.json holds every per-document score (large): read it only for the model
    # name or router config that an evaluation-only run records nowhere else.
    results_json = path / "eval" / "results.json"
    if results_json.is_file() and (run._lookup("model", "model_name", "model_id") is None or not run.config):
        obj = _read_json(results_json)
        if not isinstance(obj, dict):
            raise MalformedRun("eval/results.json: not a JSON object")
        run.files["eval/results.json"] = obj
    return run


def _runs_dir(root: str | Path) -> Path:
    root = Path(root)
    return root / "runs" if (root / "runs").is_dir() else root


def load_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """All readable run folders under ``root`` (a results folder holding ``runs/``, or the
    runs folder itself) and one problem line per folder left out."""
    runs_dir = _runs_dir(root)
    runs, problems = [], []
    if not runs_dir.is_dir():
        return runs, problems
    for path in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            runs.append(read_run(path))
        except MalformedRun as exc:
            msg = f"{path.name}: {exc}"
            log.warning("left out run folder %s", msg)
            problems.append(msg)
    return runs, problems


# ---------------------------------------------------------------------------- tidy runs
TIDY_COLUMNS = ["run_id", "model", "dataset", "variant", "method", "granularity", "route_level", "threshold",
                "task", "task_name", "metric", "value", "stderr", "n", "num_fewshot", "skip_ratio", "speedup",
                "diff", "ci_low", "ci_high", "created"]


def profile_speedup(run: Run, variant: str, threshold: float | None = None, skip_ratio: float | None = None,
                    regime: str = "prefill") -> float:
    """Measured speedup of one eval operating point from the same run's profile/profile.csv.

    Median of ``speedup`` over the ``ok`` grid points of ``regime`` for the matching profile
    rows: ``dense`` -> 1 by definition (when the run was profiled); a routed variant
    (``mindskip``, ``lora+mindskip``, ...) -> rows of that variant at the eval threshold
    (rows without a threshold count as measured at the run's configured threshold);
    ``static_drop*`` -> static_drop rows with the same skip ratio (+-0.01). A profile row's
    threshold is its ``threshold`` column, else profile/profile.json ``threshold``, else the
    run's configured one. NaN when the run has no such measurement.
    """
    prof = run.files.get("profile/profile.csv")
    if prof is None:
        return float("nan")
    ok = prof[(prof["regime"] == regime) & (prof["status"].fillna("ok") == "ok")].dropna(subset=["speedup"])
    method = variant_method(variant)
    if method == "baseline":
        return 1.0 if (ok["variant"] == "dense").any() else float("nan")
    if method == "attention-drop":
        rows = ok[ok["variant"] == "static_drop"]
        if skip_ratio is not None and not pd.isna(skip_ratio):
            rows = rows[(rows["skip_ratio"] - float(skip_ratio)).abs() <= 0.01]
        elif rows["skip_ratio"].round(3).nunique() > 1:
            return float("nan")
    else:
        rows = ok[ok["variant"] == variant]
        measured_at = (run.files.get("profile/profile.json") or {}).get("threshold")
        default = run.threshold if measured_at is None else float(measured_at)
        thr = rows["threshold"] if "threshold" in rows else pd.Series(np.nan, index=rows.index)
        thr = thr.fillna(default)
        want = run.threshold if threshold is None or pd.isna(threshold) else float(threshold)
        rows = rows[(thr - want).abs() <= 1e-6]
    return float(rows["speedup"].median()) if len(rows) else float("nan")


def _paired_lookup(run: Run) -> dict:
    paired = run.files.get("eval/paired.csv")
    out: dict = {}
    if paired is None:
        return out
    has_thr = "threshold" in paired
    for r in paired.itertuples(index=False):
        thr = getattr(r, "threshold") if has_thr else float("nan")
        key = (r.variant, r.task, r.metric, None if pd.isna(thr) else round(float(thr), 6))
        out[key] = (r.diff, r.ci_low, r.ci_high)
    return out


def _run_rows(run: Run, regime: str) -> list[dict]:
    res = run.files.get("eval/results.csv")
    if res is None:
        return []
    paired = _paired_lookup(run)
    # paired.csv without a threshold column can only be matched when the variant has one threshold
    n_thresholds = res.groupby("variant")["threshold"].nunique()
    rows = []
    for r in res.itertuples(index=False):
        method = variant_method(r.variant)
        if method == "router-tuning" and run.trainable != "routers":
            method = f"{run.trainable}+router-tuning"  # routers tuned together with LoRA / the backbone
        routed = method.endswith("router-tuning")
        thr = None if pd.isna(r.threshold) else round(float(r.threshold), 6)
        diff = paired.get((r.variant, r.task, r.metric, thr))
        if diff is None and n_thresholds.get(r.variant, 0) <= 1:
            diff = paired.get((r.variant, r.task, r.metric, None))
        rows.append({
            "run_id": run.run_id, "model": run.model, "dataset": run.dataset, "variant": r.variant,
            "method": method,
            "granularity": run.granularity if routed or method == "attention-drop" else None,
            "route_level": run.route_level if routed else None,
            "threshold": r.threshold, "task": paper_task(r.task), "task_name": r.task, "metric": r.metric,
            "value": r.value, "stderr": r.stderr, "n": r.n, "num_fewshot": r.num_fewshot,
            "skip_ratio": r.skip_ratio,
            "speedup": profile_speedup(run, r.variant, r.threshold, r.skip_ratio, regime),
            "diff": diff[0] if diff else float("nan"), "ci_low": diff[1] if diff else float("nan"),
            "ci_high": diff[2] if diff else float("nan"), "created": run.created,
        })
    return rows


def _tidy(runs: list[Run], regime: str) -> pd.DataFrame:
    rows = [row for run in runs for row in _run_rows(run, regime)]
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def collect_runs(root: str | Path = "results", regime: str = "prefill") -> pd.DataFrame:
    """All evaluated operating points under ``root`` as one tidy DataFrame.

    One row per eval/results.csv row (run, variant, threshold, task, metric), with:
    - ``model``: run.json ``parameters.model`` (or ``model_name``/``model_id``, or the
      ``model`` of a step entry or eval/results.json ``provenance.model``), printed as in
      ``MODEL_NAMES``;
    - ``dataset``: ``parameters.dataset`` (or ``data``, or ``steps.train.dataset``);
    - ``granularity``, ``route_level``: the run's MindSkip config (run.json
      ``steps.train.config``, else train/summary.json ``config``, else eval/results.json
      ``provenance.mindskip.config``, else ``parameters``), set only for routed variants
      (granularity also for static drop);
    - ``method``: the paper's name for the variant: ``dense`` -> baseline, ``mindskip`` ->
      router-tuning, ``static_drop*`` -> attention-drop, ``lora``, ``lora+mindskip`` ->
      lora+router-tuning;
    - ``task``: the paper's column name (``arc_challenge`` -> ``arc_c``, ``openbookqa`` ->
      ``obqa``), ``task_name`` as written by the harness; ``macro_avg`` rows are kept here
      but tables and figures average the tasks themselves;
    - ``value``, ``stderr``, ``skip_ratio``: fractions as in eval/results.csv;
    - ``speedup``: from the run's own profile/profile.csv (``profile_speedup``; ``regime``),
      NaN when the run was not profiled at that operating point;
    - ``diff``, ``ci_low``, ``ci_high``: the paired difference to dense from eval/paired.csv.
    Folders left out are listed in ``df.attrs["problems"]`` (and logged as warnings).
    """
    runs, problems = load_runs(root)
    df = _tidy(runs, regime)
    df.attrs["problems"] = problems
    return df


# ---------------------------------------------------------------------------- table rows
def _pick_metric(sub: pd.DataFrame, task: str) -> pd.Series | None:
    rows = sub[sub["task"] == task]
    if rows.empty:
        return None
    for metric in (PAPER_METRIC.get(task), "acc", "acc_norm"):
        hit = rows[rows["metric"] == metric]
        if len(hit):
            return hit.iloc[0]
    return rows.iloc[0]


def _point(tidy: pd.DataFrame, run_id: str, method: str, threshold: float | None = None) -> pd.DataFrame:
    """Rows of one operating point: a run's variant of ``method`` (the plain label, e.g.
    ``mindskip``, when several labels share the method) at ``threshold``."""
    sub = tidy[(tidy["run_id"] == run_id) & (tidy["method"] == method)]
    labels = list(dict.fromkeys(sub["variant"]))
    if len(labels) > 1:
        plain = [v for v in labels if v in VARIANT_METHODS]
        sub = sub[sub["variant"] == (plain or labels)[0]]
    if threshold is not None and sub["threshold"].notna().any():
        at = sub[(sub["threshold"] - threshold).abs() <= 1e-6]
        if at.empty and sub["threshold"].nunique() == 1:
            at = sub
        sub = at
    return sub


def _thresholds_of(sub: pd.DataFrame) -> Any:
    """The threshold the rows were actually evaluated at ("" when none or mixed)."""
    thr = sub["threshold"].dropna().unique() if len(sub) else []
    return round(float(thr[0]), 6) if len(thr) == 1 else ""


def _tuned_points(tidy: pd.DataFrame, run_id: str, method: str = "router-tuning") -> list[pd.DataFrame]:
    """Every operating point of ``method`` in a run: one per variant label and threshold (a
    threshold sweep writes ``mindskip_t<thr>`` labels or one label with several thresholds),
    ordered by threshold."""
    sub = tidy[(tidy["run_id"] == run_id) & (tidy["method"] == method)]
    points = [g for _, g in sub.groupby([sub["variant"], sub["threshold"].fillna(-1.0)], sort=False)]
    return sorted(points, key=lambda g: (g["threshold"].dropna().min() if g["threshold"].notna().any() else -1.0))


def _scores(sub: pd.DataFrame, tasks: list[str]) -> dict:
    """Percent score per task, paired diff to dense (points) per task, speedup, skip ratio."""
    out = {"score": {}, "paired": {}, "speedup": float("nan"), "skip_ratio": float("nan")}
    for task in tasks:
        row = _pick_metric(sub, task)
        if row is None:
            continue
        out["score"][task] = 100.0 * float(row["value"])
        if not pd.isna(row["diff"]):
            out["paired"][task] = 100.0 * float(row["diff"])
    if len(sub):
        out["speedup"] = float(sub["speedup"].median()) if sub["speedup"].notna().any() else float("nan")
        out["skip_ratio"] = float(sub["skip_ratio"].mean()) if sub["skip_ratio"].notna().any() else float("nan")
    return out


def _avg(values: dict, tasks: list[str]) -> tuple[float, int]:
    got = [values[t] for t in tasks if t in values and not pd.isna(values[t])]
    return (float(np.mean(got)) if got else float("nan")), len(got)


def _row(base: dict, kind: str, tasks: list[str], values: dict, speedup: Any, avg_tasks: list[str]) -> dict:
    row = {**base, "row": kind, "speedup": speedup}
    for t in tasks:
        row[t] = values.get(t, float("nan"))
    row["avg"], row["avg_tasks"] = _avg(values, avg_tasks)
    return row


def _diff_rows(base: dict, scores: dict, dense: dict | None, paper: dict | None, tasks: list[str],
               avg_tasks: list[str]) -> list[dict]:
    """'Δ vs dense' (paired where available, else same-run difference) and 'Δ vs paper' rows."""
    out = []
    if dense is not None:
        diff = {t: scores["paired"].get(t, v - dense["score"][t]) for t, v in scores["score"].items() if t in dense["score"]}
        out.append(_row(base, "diff_dense", tasks, diff, "", avg_tasks))
    if paper is not None:
        diff = {t: v - paper[t] for t, v in scores["score"].items() if t in paper and not pd.isna(paper[t])}
        out.append(_row(base, "diff_paper", tasks, diff, "", avg_tasks))
    return out


def _table_tasks(ref: pd.DataFrame, tidy: pd.DataFrame, run_ids: list[str]) -> tuple[list[str], list[str]]:
    """The paper's task columns, then tasks only the kit ran (appended, not averaged)."""
    paper_tasks = _task_columns(ref)
    extra = sorted(set(tidy.loc[tidy["run_id"].isin(run_ids), "task"]) - set(paper_tasks) - NOT_TASKS)
    return paper_tasks + extra, paper_tasks


def _paper_rows(ref: pd.DataFrame, tasks: list[str]) -> list[dict]:
    rows = []
    for rec in ref.to_dict("records"):
        row = {"source": "paper", "run_id": "", "row": "score", **rec}
        for t in tasks:
            row.setdefault(t, float("nan"))
        row["avg_tasks"] = len(_task_columns(ref))
        rows.append(row)
    return rows


def _paper_match(ref: pd.DataFrame, model: str, **keys) -> dict | None:
    hit = ref[ref["model"] == model] if "model" in ref else ref
    for k, v in keys.items():
        col = hit[k].fillna("") if k in hit else None
        if col is None:
            continue
        hit = hit[col == (v or "")]
    return hit.iloc[0].to_dict() if len(hit) == 1 else None


def _has(tidy: pd.DataFrame, run: Run, method: str) -> bool:
    return bool(((tidy["run_id"] == run.run_id) & (tidy["method"] == method)).any())


def _kit_runs(tidy: pd.DataFrame, runs: list[Run], predicate) -> list[Run]:
    have = set(tidy["run_id"])
    return sorted((r for r in runs if r.run_id in have and predicate(r)), key=lambda r: (r.model, r.created, r.run_id))


def _dense_scores(tidy: pd.DataFrame, run_id: str, tasks: list[str]) -> dict | None:
    """The run's dense (baseline) scores, or None when it has no dense evaluation."""
    sub = _point(tidy, run_id, "baseline")
    return _scores(sub, tasks) if len(sub) else None


def main_table(runs: list[Run], tidy: pd.DataFrame, reference_dir=None) -> pd.DataFrame:
    """Main table: the paper's rows, then per kit run with a mindskip variant its dense row
    (once when several runs share it), a router-tuning row per evaluated threshold with Δ vs
    dense and, for the paper's own models, Δ vs paper."""
    ref = load_reference("main_table", reference_dir)
    chosen = _kit_runs(tidy, runs, lambda r: _has(tidy, r, "router-tuning"))
    tasks, paper_tasks = _table_tasks(ref, tidy, [r.run_id for r in chosen])
    rows = _paper_rows(ref, tasks)
    shown_dense = set()  # runs of a sweep share one dense evaluation (dense_from): its row is shown once
    for run in chosen:
        base = {"source": "kit", "run_id": run.run_id, "model": run.model}
        dense = _dense_scores(tidy, run.run_id, tasks)
        key = (run.model, tuple(sorted((t, round(v, 6)) for t, v in dense["score"].items()))) if dense else None
        if key is None or key not in shown_dense:
            shown_dense.add(key)
            rows.append(_row({**base, "method": "baseline", "granularity": "", "route_level": "", "threshold": ""},
                             "score", tasks, dense["score"] if dense else {},
                             dense["speedup"] if dense else float("nan"), paper_tasks))
        paper = _paper_match(ref, run.model, method="router-tuning", granularity=run.granularity,
                             route_level=run.route_level)
        for point in _tuned_points(tidy, run.run_id):  # each evaluated threshold, labelled with its own value
            sc = _scores(point, tasks)
            rb = {**base, "method": "router-tuning", "granularity": run.granularity or "",
                  "route_level": run.route_level or "", "threshold": _thresholds_of(point)}
            rows.append(_row(rb, "score", tasks, sc["score"], sc["speedup"], paper_tasks))
            rows.extend(_diff_rows(rb, sc, dense, paper, tasks, paper_tasks))
    return _finish(rows, ["source", "run_id", "model", "method", "granularity", "route_level", "threshold", "row",
                          "speedup", *tasks, "avg", "avg_tasks"])


def lora_table(runs: list[Run], tidy: pd.DataFrame, reference_dir=None) -> pd.DataFrame:
    """LoRA table: the paper's rows, then per kit run with a LoRA operating point its
    baseline, router-tuning, lora and lora+router-tuning rows ("not run" where the run has
    none), each evaluated one with Δ vs dense."""
    ref = load_reference("lora_table", reference_dir)
    chosen = _kit_runs(tidy, runs, lambda r: tidy.loc[tidy["run_id"] == r.run_id, "method"].str.startswith("lora").any())
    tasks, paper_tasks = _table_tasks(ref, tidy, [r.run_id for r in chosen])
    rows = _paper_rows(ref, tasks)
    for run in chosen:
        dense = _dense_scores(tidy, run.run_id, tasks)
        for method in ("baseline", "router-tuning", "lora", "lora+router-tuning"):
            thr = run.threshold if method.endswith("router-tuning") else None
            point = _point(tidy, run.run_id, method, thr)
            sc = _scores(point, tasks)  # an operating point the run lacks stays in the table as "not run"
            rb = {"source": "kit", "run_id": run.run_id, "model": run.model, "method": method,
                  "threshold": _thresholds_of(point) if thr is not None else ""}  # the evaluated value
            rows.append(_row(rb, "score", tasks, sc["score"], sc["speedup"], paper_tasks))
            if method != "baseline" and len(point):
                rows.extend(_diff_rows(rb, sc, dense, _paper_match(ref, run.model, method=method), tasks, paper_tasks))
    return _finish(rows, ["source", "run_id", "model", "method", "threshold", "row", "speedup", *tasks, "avg",
                          "avg_tasks"])


def data_ablation_table(runs: list[Run], tidy: pd.DataFrame, reference_dir=None) -> pd.DataFrame:
    """Tuning-data ablation: the paper's rows (Llama-3-8B), then per kit run with attn
    granularity and a mindskip variant its dense row and its mindskip row labelled with the
    run's tuning data, with Δ vs dense (and Δ vs paper for Llama-3-8B on the same data)."""
    ref = load_reference("data_ablation", reference_dir).copy()
    ref.insert(0, "model", "Llama-3-8B")  # stated in the table's source line
    chosen = _kit_runs(tidy, runs, lambda r: r.granularity == "attn" and _has(tidy, r, "router-tuning"))
    tasks, paper_tasks = _table_tasks(ref, tidy, [r.run_id for r in chosen])
    rows = _paper_rows(ref, tasks)
    for run in chosen:
        base = {"source": "kit", "run_id": run.run_id, "model": run.model}
        dense = _dense_scores(tidy, run.run_id, tasks)
        rows.append(_row({**base, "data": "baseline"}, "score", tasks, dense["score"] if dense else {}, "",
                         paper_tasks))
        data = (run.dataset or "not recorded").lower()
        points = _tuned_points(tidy, run.run_id)
        for point in points:
            sc = _scores(point, tasks)
            # several thresholds of one run: each labelled with its value
            label = data if len(points) == 1 else f"{data} (threshold {_thresholds_of(point)})"
            rb = {**base, "data": label}
            rows.append(_row(rb, "score", tasks, sc["score"], "", paper_tasks))
            rows.extend(_diff_rows(rb, sc, dense, _paper_match(ref, run.model, data=data), tasks, paper_tasks))
    df = _finish(rows, ["source", "run_id", "model", "data", "row", *tasks, "avg", "avg_tasks"])
    return df


def _finish(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in columns:
        if c not in df:
            df[c] = ""
    return df[columns]


# ---------------------------------------------------------------------------- rendering
def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(v, col: str, kind: str, n_avg: int, avg_tasks) -> str:
    if isinstance(v, str):
        return v  # "" = not applicable
    if _is_missing(v):
        return NOT_RUN
    if col == "speedup":
        return f"{v:.2f}"
    text = f"{v:+.1f}" if kind != "score" else f"{v:.1f}"
    if col == "avg" and not _is_missing(avg_tasks) and int(avg_tasks) < n_avg:
        text += f" ({int(avg_tasks)}/{n_avg})"
    return text


def display_table(df: pd.DataFrame, tasks: list[str], n_avg: int) -> pd.DataFrame:
    """Strings for Markdown/LaTeX: measures formatted like the paper, empty measures 'not run'."""
    measures = ["speedup", *tasks, "avg"]
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        if col in ("row", "avg_tasks", "run_id"):
            continue
        if col in measures:
            out[col] = [_cell(v, col, k, n_avg, a) for v, k, a in zip(df[col], df["row"], df["avg_tasks"])]
        elif col == "source":
            out[col] = ["paper" if s == "paper" else f"kit {r}" for s, r in zip(df["source"], df["run_id"])]
        else:
            vals = df[col].astype(object).where(df[col].notna(), "")
            out[col] = [("" if v == "" else (f"{v:g}" if isinstance(v, float) else str(v))) for v in vals]
    label_col = "method" if "method" in out else "data"
    labels = {"diff_dense": "Δ vs dense", "diff_paper": "Δ vs paper"}
    out[label_col] = [labels.get(k, v) for k, v in zip(df["row"], out[label_col])]
    return out.rename(columns={"route_level": "route level"})


def to_csv_text(df: pd.DataFrame, tasks: list[str]) -> str:
    """CSV of a built table: numbers rounded to 2 decimals, never-run measures as 'not run'."""
    out = df.copy().astype(object)
    measures = [c for c in ("speedup", *tasks, "avg") if c in df]
    for col in measures:
        out[col] = [v if isinstance(v, str) else (NOT_RUN if _is_missing(v) else round(float(v), 2)) for v in df[col]]
    for col in out.columns:
        if col not in measures:
            out[col] = out[col].where(df[col].notna(), "")
    return out.to_csv(index=False, lineterminator="\n")


def to_markdown(display: pd.DataFrame, title: str, notes: list[str]) -> str:
    cols = list(display.columns)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for rec in display.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in rec) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
               "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    s = "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(text))
    return s.replace("Δ", r"$\Delta$").replace("−", "-")


def to_latex(display: pd.DataFrame, caption: str, label: str) -> str:
    cols = list(display.columns)
    numeric = {c for c in cols if c not in ("source", "model", "method", "granularity", "route level", "data", "threshold")}
    spec = "".join("r" if c in numeric else "l" for c in cols)
    lines = [r"% needs \usepackage{booktabs,graphicx}", r"\begin{table*}[t]", r"\centering",
             r"\resizebox{\textwidth}{!}{%", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    prev_source = None
    for rec in display.itertuples(index=False):
        source = rec[0]
        if prev_source is not None and source != prev_source:
            lines.append(r"\midrule")
        prev_source = source
        lines.append(" & ".join(_tex(v) for v in rec) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}",
              r"\end{table*}"]
    return "\n".join(lines) + "\n"


def _notes(name: str, ref_dir, n_avg: int, regime: str, problems: list[str]) -> list[str]:
    notes = [f"Paper rows: results/reference/{name}.csv ({reference_source(name, ref_dir)[0]} Sources: "
             "results/reference/README.md.)",
             "Kit rows: results/runs/<run>/eval/results.csv, value x 100 (accuracy in percent, the paper's metric per "
             "task where the run has it); the run id is in the source column.",
             "Δ vs dense: kit variant minus the same run's dense model, in points (paired on identical documents "
             "where eval/paired.csv has it). Δ vs paper: kit minus the paper's row for the same model and "
             "configuration, shown only for the paper's own models.",
             f"avg: mean over the paper's task columns a row has; '(k/{n_avg})' marks a kit row with fewer tasks. "
             "Tasks the paper did not report are appended as extra columns and left out of avg.",
             "not run: no result exists for that cell; nothing is filled in from elsewhere."]
    if name == "main_table":
        notes.append("A baseline row shared by several kit runs (the same dense scores, e.g. a sweep reusing one "
                     "dense evaluation) is shown once, above the first of them.")
    if name != "data_ablation":
        notes.append(f"Kit speedup: median over the {regime} grid points of profile/profile.csv of dense latency / "
                     "variant latency in the same run; the paper does not state how it measured its speedups.")
    if problems:
        notes.append("Run folders left out: " + "; ".join(problems))
    return notes


def write_table(df: pd.DataFrame, name: str, out_dir: str | Path, title: str, notes: list[str],
                paper_task_count: int) -> list[Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.tex``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [c for c in df.columns if c not in {"source", "run_id", "model", "method", "granularity", "route_level",
                                                  "threshold", "row", "speedup", "avg", "avg_tasks", "data"}]
    disp = display_table(df, tasks, paper_task_count)
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.csv", out_dir / f"{name}.tex"]
    paths[0].write_text(to_markdown(disp, title, notes), encoding="utf-8")
    paths[1].write_text(to_csv_text(df, tasks), encoding="utf-8")
    paths[2].write_text(to_latex(disp, title + ". " + " ".join(notes[:1]), f"tab:{name}"), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------- figure data
def _mean_over_common(points: list[pd.DataFrame]) -> tuple[list[float], list[str]]:
    """Average percent score of each point over the tasks every point has."""
    per = []
    for sub in points:
        per.append({t: 100.0 * float(_pick_metric(sub, t)["value"]) for t in set(sub["task"]) - NOT_TASKS})
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return [float(np.mean([p[t] for t in common])) if common else float("nan") for p in per], common


def operating_points(tidy: pd.DataFrame, run_id: str) -> tuple[pd.DataFrame, list[str]]:
    """One row per operating point of a run (dense, each mindskip threshold, each static-drop
    skip ratio): ``method``, ``variant``, ``threshold``, ``skip_ratio``, ``speedup``,
    ``accuracy`` (percent, averaged over the tasks every point has; returned second)."""
    sub = tidy[(tidy["run_id"] == run_id) & tidy["method"].isin(["baseline", "router-tuning", "attention-drop"])]
    keys, points = [], []
    for (variant, thr, skip), g in sub.groupby(
            [sub["variant"], sub["threshold"].fillna(-1.0),
             np.where(sub["method"] == "attention-drop", sub["skip_ratio"].round(3), -1.0)], sort=True):
        keys.append((variant, g))
        points.append(g)
    acc, common = _mean_over_common(points)
    rows = []
    for (variant, g), a in zip(keys, acc):
        method = {"baseline": "dense", "router-tuning": "mindskip", "attention-drop": "static_drop"}[g["method"].iloc[0]]
        rows.append({"method": method, "variant": variant,
                     "threshold": g["threshold"].iloc[0], "skip_ratio": 0.0 if method == "dense" else g["skip_ratio"].mean(),
                     "speedup": g["speedup"].median(), "accuracy": a})
    return pd.DataFrame(rows, columns=["method", "variant", "threshold", "skip_ratio", "speedup", "accuracy"]), common


def figure2_kit_points(runs: list[Run], tidy: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """The kit's Figure 2 curve: the attn-granularity run with the most static-drop and
    MindSkip operating points (newest on ties), so every point is scored on the same documents."""
    best = None
    for run in runs:
        if run.granularity not in (None, "attn"):
            continue
        pts, common = operating_points(tidy, run.run_id)
        if not (pts["method"] == "dense").any() or not common:
            continue
        n = int((pts["method"] != "dense").sum())
        if n and (best is None or (n, run.created) > (best[0], best[1].created)):
            best = (n, run, pts, common)
    if best is None:
        return None
    _, run, pts, common = best
    kit = pts.rename(columns={"accuracy": "performance"})[["skip_ratio", "method", "performance"]]
    title = f"rt-kit: {run.model}\nrun {run.run_id} ({len(common)} tasks)"
    return kit, title


# ---------------------------------------------------------------------------- build
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _skip_stats_for_heatmap(run: Run) -> pd.DataFrame | None:
    ss = run.files.get("eval/skip_stats.csv")
    if ss is None:
        return None
    ss = ss[ss["variant"] == "mindskip"]
    if "threshold" in ss and ss["threshold"].notna().any():
        thr = ss["threshold"]
        nearest = thr.iloc[int((thr - run.threshold).abs().argmin())]
        ss = ss[thr == nearest]
    return ss if len(ss) else None


def build_figures(runs: list[Run], tidy: pd.DataFrame, out_figures: str | Path, reference_dir=None,
                  problems: list[str] | None = None) -> dict:
    """Figure 2 and, per run, training curves, capacity heatmap, speedup vs skip ratio and
    accuracy vs speed (each where the run has the files). A figure that fails on a run's
    data is skipped with a warning and a line in ``problems``; the others are still drawn."""
    from rt_lib import plots

    out = Path(out_figures)
    written: dict[str, list[Path]] = {}
    problems = problems if problems is not None else []

    def save(name, run_id, draw):
        try:
            fig = draw()
        except Exception as exc:  # one run's odd data must not stop the other figures
            msg = f"{run_id}: figure {name} not drawn ({type(exc).__name__}: {exc})"
            log.warning(msg)
            problems.append(msg)
            return
        written[name] = plots.save_figure(fig, out / name)

    ref = load_reference("drop_vs_mindskip", reference_dir)
    kit = figure2_kit_points(runs, tidy)
    save("fig2_drop_vs_mindskip", "reference",
         lambda: plots.plot_drop_vs_mindskip(ref, *(kit if kit else (pd.DataFrame(), "rt-kit: not run"))))
    for run in runs:
        rid, label = _safe(run.run_id), f"{run.model}, run {run.run_id}"
        if "train/log.csv" in run.files:
            save(f"training_curves_{rid}", run.run_id, lambda: plots.plot_training_curves(
                run.files["train/log.csv"], run.capacity_target, title=f"Router-Tuning, {label}"))
        ss = _skip_stats_for_heatmap(run)
        if ss is not None:
            thr = f", τ = {ss['threshold'].iloc[0]:g}" if "threshold" in ss and ss["threshold"].notna().any() else ""
            save(f"capacity_heatmap_{rid}", run.run_id, lambda: plots.plot_capacity_heatmap(
                ss, title=f"executed fraction per layer, {label}{thr}"))
        if "profile/profile.csv" in run.files:
            save(f"speedup_vs_skip_{rid}", run.run_id, lambda: plots.plot_speedup_vs_skip(
                run.files["profile/profile.csv"], title=f"speedup vs skip ratio, {label}"))
        pts, common = operating_points(tidy, run.run_id)
        if (pts["method"] != "dense").any() and common:
            save(f"accuracy_vs_speedup_{rid}", run.run_id, lambda: plots.plot_accuracy_vs_speedup(
                pts, title=f"accuracy vs speed, {label}",
                accuracy_label=f"average accuracy over {len(common)} tasks (%)"))
    return written


def _eval_settings(tidy: pd.DataFrame, run_ids: list[str]) -> list[str]:
    """One note line: how each kit run's rows were scored (documents and shots per task), so
    rows scored on different documents or shots are not read as comparable."""
    groups: dict[str, list[str]] = {}  # settings -> runs scored that way
    for rid in run_ids:
        sub = tidy[(tidy["run_id"] == rid) & (tidy["method"] == "baseline") & ~tidy["task"].isin(NOT_TASKS)]
        sub = sub if len(sub) else tidy[(tidy["run_id"] == rid) & ~tidy["task"].isin(NOT_TASKS)]
        if not len(sub):
            continue
        per = sub.drop_duplicates("task")
        desc = ", ".join(f"{r.task} n={int(r.n)}/{int(r.num_fewshot)}-shot" if not pd.isna(r.n) and not pd.isna(r.num_fewshot)
                         else f"{r.task}" for r in per.itertuples())
        groups.setdefault(desc, []).append(rid)
    parts = [f"{', '.join(rids)}: {desc}" for desc, rids in groups.items()]
    return ["Kit evaluation settings (documents scored / shots per task): " + "; ".join(parts)] if parts else []


def build_tables(runs: list[Run], tidy: pd.DataFrame, out_tables: str | Path, reference_dir=None,
                 regime: str = "prefill", problems: list[str] | None = None) -> dict:
    problems = problems or []
    written: dict[str, list[Path]] = {}
    specs = [
        ("main_table", main_table, "Main results: dynamic depth by granularity and route level"),
        ("lora_table", lora_table, "Router-Tuning combined with LoRA"),
        ("data_ablation", data_ablation_table, "Tuning-data ablation (attn granularity)"),
    ]
    for name, builder, title in specs:
        df = builder(runs, tidy, reference_dir)
        n_avg = len(_task_columns(load_reference(name, reference_dir)))
        notes = _notes(name, reference_dir, n_avg, regime, problems)
        shown = list(dict.fromkeys(df.loc[df["source"] == "kit", "run_id"])) if len(df) else []
        notes += _eval_settings(tidy, shown)
        written[name] = write_table(df, name, out_tables, title, notes, n_avg)
    Path(out_tables).mkdir(parents=True, exist_ok=True)
    runs_csv = Path(out_tables) / "runs.csv"
    runs_csv.write_text(tidy.to_csv(index=False, lineterminator="\n"), encoding="utf-8")
    written["runs"] = [runs_csv]
    return written


def build_all(results_root: str | Path = "results", out_tables: str | Path = "results/tables",
              out_figures: str | Path = "results/figures", reference_dir: str | Path | None = None,
              regime: str = "prefill", figures: bool = True) -> dict:
    """Rebuild every table and figure from the files under ``results_root``.

    Returns ``{"tables": {name: [paths]}, "figures": {name: [paths]}, "problems": [lines]}``;
    each problem names a run folder left out and why. ``reference_dir`` defaults to
    ``<results_root>/reference`` when it exists, else the kit's ``results/reference``.
    ``figures=False`` builds the tables only.
    """
    if reference_dir is None:
        candidate = Path(results_root) / "reference"
        reference_dir = candidate if (candidate / "main_table.csv").is_file() else DEFAULT_REFERENCE_DIR
    runs, problems = load_runs(results_root)
    tidy = _tidy(runs, regime)
    tables = build_tables(runs, tidy, out_tables, reference_dir, regime, problems)
    figs = build_figures(runs, tidy, out_figures, reference_dir, problems) if figures else {}
    log.info("built %d tables and %d figures from %d runs", len(tables), len(figs), len(runs))
    return {"tables": tables, "figures": figs, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rt_lib.paper", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="results folder holding runs/ and reference/")
    p.add_argument("--tables", default=None, help="output folder for tables (default <results>/tables)")
    p.add_argument("--figures", default=None, help="output folder for figures (default <results>/figures)")
    p.add_argument("--regime", default="prefill", choices=["prefill", "decode"], help="profile regime for speedups")
    p.add_argument("--no-figures", action="store_true", help="build the tables only")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a run folder was left out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rt_lib").setLevel(logging.INFO)
    root = Path(args.results)
    out = build_all(root, args.tables or root / "tables", args.figures or root / "figures", regime=args.regime,
                    figures=not args.no_figures)
    for kind in ("tables", "figures"):
        for name, paths in out[kind].items():
            print(f"{kind[:-1]:6s} {name}: " + ", ".join(str(p) for p in paths))
    for line in out["problems"]:
        print(f"left out: {line}", file=sys.stderr)
    return 1 if args.strict and out["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
