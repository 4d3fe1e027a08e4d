"""The kit's runs as one tidy table: one row per evaluated operating point.

``collect_runs`` turns every readable run folder (rt_lib.runs.read) into rows of
``results/tables/runs.csv`` (columns: rt_lib.runs.schema ``TIDY_RUNS``): the run's eval/results.csv
rows with the paper's task names, the run's MindSkip config, the measured speedup
from the same run's profile and the paired difference to dense. The paper's tables and
figures (rt_lib.paper.tables, rt_lib.paper.figures) are built from this table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rt_lib.runs import schema
from rt_lib.runs.read import Run, load_runs

# lm-evaluation-harness task names -> the paper's column names.
TASK_ALIASES = {
    "arc_challenge": "arc_c", "arc-challenge": "arc_c", "arc_c": "arc_c",
    "openbookqa": "obqa", "obqa": "obqa",
    "boolq": "boolq", "hellaswag": "hellaswag", "mmlu": "mmlu", "piqa": "piqa", "rte": "rte",
    "winogrande": "winogrande",
}
# The metric the paper reports per task.
PAPER_METRIC = {
    "arc_c": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm", "mmlu": "acc",
    "obqa": "acc_norm", "piqa": "acc_norm", "rte": "acc", "winogrande": "acc",
}
# Rows of eval/results.csv that are summaries, not tasks (rt_lib.evaluation.driver's macro average):
# tables and figures average the tasks themselves.
NOT_TASKS = {"macro_avg"}
# The paper's method names -> the kit's (one word per idea everywhere in the kit; the published
# tables are translated on reading, rt_lib.paper.tables.load_reference).
PAPER_METHODS = {
    "baseline": "dense",
    "router-tuning": "mindskip",
    "attention-drop": "static_drop",
    "lora": "lora",
    "lora+router-tuning": "lora+mindskip",
}
METHOD_NOTE = ("Method names: `dense` is the paper's baseline, `mindskip` its Router-Tuning (routers tuned, "
               "the rest frozen), `static_drop` its attention drop; `lora+mindskip` is LoRA + Router-Tuning.")


# ---------------------------------------------------------------------------- names
def paper_task(name: str) -> str:
    """Task name as the paper's tables spell it (``arc_challenge``, ``arc_challenge_offline``
    -> ``arc_c``); others unchanged."""
    key = str(name).strip().lower().removesuffix("_offline")
    return TASK_ALIASES.get(key, str(name))


def kit_method(method: str) -> str:
    """The kit's method name (``dense``, ``mindskip``, ``static_drop``, ``lora``,
    ``lora+mindskip``) for a results.csv ``method`` value or a paper's method name
    (``baseline`` -> ``dense``, ...); others unchanged. A results.csv written before the
    ``method`` column existed gets it from its variant labels (``eval_results.with_variant_columns``)."""
    v = str(method).strip().lower()
    if v in PAPER_METHODS:
        return PAPER_METHODS[v]
    if v.startswith("lora") and ("mindskip" in v or "router-tuning" in v):
        return "lora+mindskip"
    if v.startswith("static_drop"):
        return "static_drop"
    return str(method)


# ---------------------------------------------------------------------------- tidy runs
TIDY_COLUMNS = schema.TIDY_RUNS.names


def profile_speedup(run: Run, variant: str, threshold: float | None = None, k: float | None = None,
                    regime: str = "prefill", method: str | None = None) -> float:
    """Measured speedup of one eval operating point from the same run's profile/profile.csv.

    Median of ``speedup`` over the ``ok`` grid points of ``regime`` for the matching profile
    rows: ``dense`` -> 1 by definition (when the run was profiled); a routed variant
    (``mindskip``, ``lora+mindskip``, ...) -> rows of that variant at the eval threshold
    (rows without a threshold count as measured at the run's configured threshold);
    ``static_drop*`` -> the profile's static_drop rows when they removed ``k`` layers (the
    length of profile/profile.json ``static_layers``; a profile without it: its ``skip_ratio``,
    removed / routed layers, times its routed layers). A profile row's threshold is its
    ``threshold`` column, else profile/profile.json ``threshold``, else the run's configured
    one. NaN when the run has no such measurement.
    """
    prof = run.files.get("profile/profile.csv")
    if prof is None:
        return float("nan")
    ok = prof[(prof["regime"] == regime) & (prof["status"].fillna("ok") == "ok")].dropna(subset=["speedup"])
    method = kit_method(method or variant)
    if method == "dense":
        return 1.0 if (ok["variant"] == "dense").any() else float("nan")
    if method == "static_drop":
        rows = ok[ok["variant"] == "static_drop"]
        info = run.files.get("profile/profile.json") or {}
        if k is not None and not pd.isna(k):
            if info.get("static_layers") is not None:
                rows = rows if len(info["static_layers"]) == int(k) else rows.iloc[:0]
            else:
                routed = len(info.get("routed_layers") or [])
                rows = rows[(rows["skip_ratio"] * routed).round() == int(k)] if routed else rows.iloc[:0]
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
        thr = r.threshold if has_thr else float("nan")
        key = (r.variant, r.task, r.metric, None if pd.isna(thr) else round(float(thr), 6))
        out[key] = (r.diff, r.ci_low, r.ci_high)
    return out


def _run_rows(run: Run, regime: str) -> list[dict]:
    res = run.files.get("eval/results.csv")
    if res is None:
        return []
    from rt_lib.evaluation.results import with_variant_columns

    res = with_variant_columns(res)
    paired = _paired_lookup(run)
    # paired.csv without a threshold column can only be matched when the variant has one threshold
    n_thresholds = res.groupby("variant")["threshold"].nunique()
    rows = []
    for r in res.itertuples(index=False):
        method = kit_method(r.method)
        if method == "mindskip" and run.trainable != "routers":
            method = f"{run.trainable}+mindskip"  # routers tuned together with LoRA / the backbone
        routed = method.endswith("mindskip")
        thr = None if pd.isna(r.threshold) else round(float(r.threshold), 6)
        diff = paired.get((r.variant, r.task, r.metric, thr))
        if diff is None and n_thresholds.get(r.variant, 0) <= 1:
            diff = paired.get((r.variant, r.task, r.metric, None))
        rows.append({
            "run_id": run.run_id, "model": run.model, "dataset": run.dataset, "variant": r.variant,
            "method": method,
            "granularity": run.granularity if routed or method == "static_drop" else None,
            "route_level": run.route_level if routed else None,
            "threshold": r.threshold, "task": paper_task(r.task), "task_name": r.task, "metric": r.metric,
            "value": r.value, "stderr": r.stderr, "n": r.n, "num_fewshot": r.num_fewshot,
            "skip_ratio": r.skip_ratio,
            "speedup": profile_speedup(run, r.variant, r.threshold, r.k, regime, r.method),
            "diff": diff[0] if diff else float("nan"), "ci_low": diff[1] if diff else float("nan"),
            "ci_high": diff[2] if diff else float("nan"), "created": run.created,
        })
    return rows


def tidy_runs(runs: list[Run], regime: str = "prefill") -> pd.DataFrame:
    """The rows of ``collect_runs`` for runs already read."""
    rows = [row for run in runs for row in _run_rows(run, regime)]
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def collect_runs(root: str | Path = "results", regime: str = "prefill") -> pd.DataFrame:
    """All evaluated operating points under ``root`` as one tidy DataFrame.

    One row per eval/results.csv row (run, variant, threshold, task, metric), with:
    - ``model``, ``dataset`` and the run's ``granularity``, ``route_level``: looked up by
      ``rt_lib.runs.read.setting`` (the MindSkip config, then each step's ``parameters``); the
      model printed as in ``MODEL_NAMES``; granularity and route level set only for routed
      variants (granularity also for static drop);
    - ``method``: the kit's method (``dense``, ``mindskip``, ``static_drop``, ``lora``,
      ``lora+mindskip``; ``full+mindskip`` for routers tuned with the whole model);
    - ``task``: the paper's column name (``arc_challenge`` -> ``arc_c``, ``openbookqa`` ->
      ``obqa``), ``task_name`` as written by the harness; ``macro_avg`` rows are kept here
      but tables and figures average the tasks themselves;
    - ``value``, ``stderr``, ``skip_ratio``: fractions as in eval/results.csv (``skip_ratio`` of
      all layers, files written when it was of the routed layers converted on reading);
    - ``speedup``: from the run's own profile/profile.csv (``profile_speedup``; ``regime``),
      NaN when the run was not profiled at that operating point;
    - ``diff``, ``ci_low``, ``ci_high``: the paired difference to dense from eval/paired.csv.
    Folders left out are listed in ``df.attrs["problems"]`` (and logged as warnings).
    """
    runs, problems = load_runs(root)
    df = tidy_runs(runs, regime)
    df.attrs["problems"] = problems
    return df


def pick_metric(sub: pd.DataFrame, task: str) -> pd.Series | None:
    """The row of ``task`` with the paper's metric for it (else ``acc``, ``acc_norm``, the first)."""
    rows = sub[sub["task"] == task]
    if rows.empty:
        return None
    for metric in (PAPER_METRIC.get(task), "acc", "acc_norm"):
        hit = rows[rows["metric"] == metric]
        if len(hit):
            return hit.iloc[0]
    return rows.iloc[0]
