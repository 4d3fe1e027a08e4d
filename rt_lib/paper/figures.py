"""The paper's Figure 2 and the per-run figures, built from the kit's tidy rows and run files.

``build_figures`` draws, per run, training curves (train/log.csv), the executed-fraction
heatmap (eval/skip_stats.csv), speedup vs skip ratio (profile/profile.csv) and accuracy vs
speed (the run's operating points), and Figure 2 (static attention drop vs MindSkip) with the
kit's curve beside the paper's. Drawing is rt_lib.plots; this module chooses the data.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from rt_lib.paper.tables import load_reference
from rt_lib.runs.read import Run
from rt_lib.paper.tidy import NOT_TASKS, pick_metric

log = logging.getLogger(__name__)


def _mean_over_common(points: list[pd.DataFrame]) -> tuple[list[float], list[str]]:
    """Average percent score of each point over the tasks every point has."""
    per = []
    for sub in points:
        per.append({t: 100.0 * float(pick_metric(sub, t)["value"]) for t in set(sub["task"]) - NOT_TASKS})
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return [float(np.mean([p[t] for t in common])) if common else float("nan") for p in per], common


def _paired_half_width(sub: pd.DataFrame, tasks: list[str]) -> float:
    """Half-width (percent points) of the paired 95% interval of a point's macro difference to
    dense over ``tasks``: per-task t intervals from paired.csv, combined as independent
    (se = sqrt(sum se_t^2) / T); NaN when a task has no paired interval (dense, or not paired)."""
    ses = []
    for t in tasks:
        r = pick_metric(sub, t)
        lo, hi = float(r.get("ci_low", np.nan)), float(r.get("ci_high", np.nan))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return float("nan")
        ses.append((hi - lo) / 2 / 1.96)
    return 100.0 * 1.96 * float(np.sqrt(np.sum(np.square(ses)))) / len(ses) if ses else float("nan")


def operating_points(tidy: pd.DataFrame, run_id: str) -> tuple[pd.DataFrame, list[str]]:
    """One row per operating point of a run (dense, each mindskip threshold, each static-drop
    skip ratio): ``method``, ``variant``, ``threshold``, ``skip_ratio``, ``speedup``,
    ``accuracy`` (percent, averaged over the tasks every point has; returned second)."""
    sub = tidy[(tidy["run_id"] == run_id) & tidy["method"].isin(["dense", "mindskip", "static_drop"])]
    keys, points = [], []
    for (variant, thr, skip), g in sub.groupby(
            [sub["variant"], sub["threshold"].fillna(-1.0),
             np.where(sub["method"] == "static_drop", sub["skip_ratio"].round(3), -1.0)], sort=True):
        keys.append((variant, g))
        points.append(g)
    acc, common = _mean_over_common(points)
    rows = []
    for (variant, g), a in zip(keys, acc):
        method = g["method"].iloc[0]
        half = float("nan") if method == "dense" else _paired_half_width(g, common)
        rows.append({"method": method, "variant": variant,
                     "threshold": g["threshold"].iloc[0], "skip_ratio": 0.0 if method == "dense" else g["skip_ratio"].mean(),
                     "speedup": g["speedup"].median(), "accuracy": a, "ci_low": a - half, "ci_high": a + half})
    columns = ["method", "variant", "threshold", "skip_ratio", "speedup", "accuracy", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=columns), common


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
    kit = pts.rename(columns={"accuracy": "performance"})[["skip_ratio", "method", "performance", "ci_low", "ci_high"]]
    title = f"rt-kit: {run.model}\nrun {run.run_id} ({len(common)} tasks)"
    return kit, title


# ---------------------------------------------------------------------------- figures
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def figure_names(run_ids) -> dict[str, str]:
    """File-name part of each run id: unsafe characters become ``_``; where two run ids would give
    the same name (``exp 1`` and ``exp:1``), each of them gets the first 8 hex digits of its id's
    sha256 appended, so no run's figures replace another's."""
    import hashlib

    safe = {rid: _safe(rid) for rid in run_ids}
    counts: dict[str, int] = {}
    for name in safe.values():
        counts[name] = counts.get(name, 0) + 1
    return {rid: name if counts[name] == 1 else f"{name}-{hashlib.sha256(rid.encode()).hexdigest()[:8]}"
            for rid, name in safe.items()}


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
                  problems: list[str] | None = None, formats=("png",)) -> dict:
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
        written[name] = plots.save_figure(fig, out / name, formats)

    ref = load_reference("drop_vs_mindskip", reference_dir)
    kit = figure2_kit_points(runs, tidy)
    save("fig2_drop_vs_mindskip", "reference",
         lambda: plots.plot_drop_vs_mindskip(ref, *(kit if kit else (pd.DataFrame(), "rt-kit: not run"))))
    names = figure_names([run.run_id for run in runs])
    for run in runs:
        rid, label = names[run.run_id], f"{run.model}, run {run.run_id}"
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



def build_evidence_figures(results_root: str | Path, out_figures: str | Path, reference_dir=None,
                           formats=("png",)) -> dict:
    """Figures of the newest evidence run (``rt_lib.evidence.run``), every kit point with its paired
    95% interval: ``fig2_evidence`` (accuracy change vs the paper's skip ratio, with the
    published Figure 2 points), ``evidence_tasks`` (per task) and ``evidence_heldout``."""
    from rt_lib import plots
    from rt_lib.paper.claims import find_evidence_runs
    from rt_lib.paper.evidence_plots import plot_evidence_fig2, plot_heldout, plot_task_panels

    found = find_evidence_runs(results_root)
    if not found:
        return {}
    run = found[-1]
    measures_csv, heldout_csv = run / "evidence" / "measures.csv", run / "evidence" / "heldout.csv"
    if not measures_csv.exists():
        return {}
    measures = pd.read_csv(measures_csv)
    out = Path(out_figures)
    ref = load_reference("drop_vs_mindskip", reference_dir)
    n_tasks = int((~measures.task.str.startswith("macro")).sum() / max(measures.variant.nunique(), 1))
    written = {"fig2_evidence": plots.save_figure(plot_evidence_fig2(
        measures, ref, f"rt-kit evidence run {run.name}: macro over {n_tasks} tasks\n"
                       "(published points: paper Figure 2)"), out / "fig2_evidence", formats)}
    written["evidence_tasks"] = plots.save_figure(plot_task_panels(
        measures, f"accuracy change per task, run {run.name}"), out / "evidence_tasks", formats)
    if heldout_csv.exists():
        written["evidence_heldout"] = plots.save_figure(plot_heldout(
            pd.read_csv(heldout_csv), f"held-out Wikipedia loss, run {run.name}"), out / "evidence_heldout", formats)
    return written
