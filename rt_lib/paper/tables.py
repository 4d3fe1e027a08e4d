"""The paper's tables with the kit's runs beside them: rows, rendering and writers.

Each builder (``main_table``, ``lora_table``, ``data_ablation_table``) takes the runs read by
rt_lib.runs.read and their tidy rows (rt_lib.paper.tidy) and returns one DataFrame: the paper's rows
from ``results/reference/<name>.csv`` first, then the kit's. ``write_table`` writes it as
Markdown, CSV and LaTeX. A cell the kit never measured shows "not run", never a value borrowed
from elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rt_lib.runs.read import Run
from rt_lib.paper.tidy import METHOD_NOTE, NOT_TASKS, PAPER_METHODS, kit_method, pick_metric

NOT_RUN = "not run"
REFERENCE_NAMES = ("main_table", "lora_table", "data_ablation", "drop_vs_mindskip")
# The checkout's results/reference/ (an installed package has none: then ./results/reference).
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"
if not DEFAULT_REFERENCE_DIR.is_dir() and (Path.cwd() / "results" / "reference").is_dir():
    DEFAULT_REFERENCE_DIR = Path.cwd() / "results" / "reference"


# ---------------------------------------------------------------------------- reference data
def load_reference(name: str, reference_dir: str | Path | None = None) -> pd.DataFrame:
    """One of the paper's tables (``main_table``, ``lora_table``, ``data_ablation``,
    ``drop_vs_mindskip``) from ``results/reference/<name>.csv``, source comment lines skipped."""
    if name not in REFERENCE_NAMES:
        raise ValueError(f"unknown reference table {name!r}; known: {', '.join(REFERENCE_NAMES)}")
    path = Path(reference_dir or DEFAULT_REFERENCE_DIR) / f"{name}.csv"
    ref = pd.read_csv(path, comment="#")
    for col in ("method", "data"):  # the paper's method names -> the kit's (``baseline`` -> ``dense``, ...)
        if col in ref:
            ref[col] = ref[col].map(lambda v: kit_method(v) if isinstance(v, str) and v in PAPER_METHODS else v)
    return ref


def reference_source(name: str, reference_dir: str | Path | None = None) -> list[str]:
    """The ``#`` source lines at the top of a reference CSV, without the ``#``."""
    path = Path(reference_dir or DEFAULT_REFERENCE_DIR) / f"{name}.csv"
    return [line[1:].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def _task_columns(ref: pd.DataFrame) -> list[str]:
    skip = {"model", "method", "granularity", "route_level", "speedup", "avg", "data"}
    return [c for c in ref.columns if c not in skip]

# ---------------------------------------------------------------------------- table rows
def _point(tidy: pd.DataFrame, run_id: str, method: str, threshold: float | None = None) -> pd.DataFrame:
    """Rows of one operating point: a run's variant of ``method`` (the plain label, e.g.
    ``mindskip``, when several labels share the method) at ``threshold``."""
    sub = tidy[(tidy["run_id"] == run_id) & (tidy["method"] == method)]
    labels = list(dict.fromkeys(sub["variant"]))
    if len(labels) > 1:
        plain = [v for v in labels if v in PAPER_METHODS.values()]
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


def _tuned_points(tidy: pd.DataFrame, run_id: str, method: str = "mindskip") -> list[pd.DataFrame]:
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
        row = pick_metric(sub, task)
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
    """The run's dense scores, or None when it has no dense evaluation."""
    sub = _point(tidy, run_id, "dense")
    return _scores(sub, tasks) if len(sub) else None


def main_table(runs: list[Run], tidy: pd.DataFrame, reference_dir=None) -> pd.DataFrame:
    """Main table: the paper's rows, then per kit run with a mindskip variant its dense row
    (once when several runs share it), a mindskip row per evaluated threshold with Δ vs
    dense and, for the paper's own models, Δ vs paper."""
    ref = load_reference("main_table", reference_dir)
    chosen = _kit_runs(tidy, runs, lambda r: _has(tidy, r, "mindskip"))
    tasks, paper_tasks = _table_tasks(ref, tidy, [r.run_id for r in chosen])
    rows = _paper_rows(ref, tasks)
    shown_dense = set()  # runs of a sweep share one dense evaluation (dense_from): its row is shown once
    for run in chosen:
        base = {"source": "kit", "run_id": run.run_id, "model": run.model}
        dense = _dense_scores(tidy, run.run_id, tasks)
        key = (run.model, tuple(sorted((t, round(v, 6)) for t, v in dense["score"].items()))) if dense else None
        if key is None or key not in shown_dense:
            shown_dense.add(key)
            rows.append(_row({**base, "method": "dense", "granularity": "", "route_level": "", "threshold": ""},
                             "score", tasks, dense["score"] if dense else {},
                             dense["speedup"] if dense else float("nan"), paper_tasks))
        paper = _paper_match(ref, run.model, method="mindskip", granularity=run.granularity,
                             route_level=run.route_level)
        for point in _tuned_points(tidy, run.run_id):  # each evaluated threshold, labelled with its own value
            sc = _scores(point, tasks)
            rb = {**base, "method": "mindskip", "granularity": run.granularity or "",
                  "route_level": run.route_level or "", "threshold": _thresholds_of(point)}
            rows.append(_row(rb, "score", tasks, sc["score"], sc["speedup"], paper_tasks))
            rows.extend(_diff_rows(rb, sc, dense, paper, tasks, paper_tasks))
    return _finish(rows, ["source", "run_id", "model", "method", "granularity", "route_level", "threshold", "row",
                          "speedup", *tasks, "avg", "avg_tasks"])


def lora_table(runs: list[Run], tidy: pd.DataFrame, reference_dir=None) -> pd.DataFrame:
    """LoRA table: the paper's rows, then per kit run with a LoRA operating point its
    dense, mindskip, lora and lora+mindskip rows ("not run" where the run has
    none), each evaluated one with Δ vs dense."""
    ref = load_reference("lora_table", reference_dir)
    chosen = _kit_runs(tidy, runs, lambda r: tidy.loc[tidy["run_id"] == r.run_id, "method"].str.startswith("lora").any())
    tasks, paper_tasks = _table_tasks(ref, tidy, [r.run_id for r in chosen])
    rows = _paper_rows(ref, tasks)
    for run in chosen:
        dense = _dense_scores(tidy, run.run_id, tasks)
        for method in ("dense", "mindskip", "lora", "lora+mindskip"):
            thr = run.threshold if method.endswith("mindskip") else None
            point = _point(tidy, run.run_id, method, thr)
            sc = _scores(point, tasks)  # an operating point the run lacks stays in the table as "not run"
            rb = {"source": "kit", "run_id": run.run_id, "model": run.model, "method": method,
                  "threshold": _thresholds_of(point) if thr is not None else ""}  # the evaluated value
            rows.append(_row(rb, "score", tasks, sc["score"], sc["speedup"], paper_tasks))
            if method != "dense" and len(point):
                rows.extend(_diff_rows(rb, sc, dense, _paper_match(ref, run.model, method=method), tasks, paper_tasks))
    return _finish(rows, ["source", "run_id", "model", "method", "threshold", "row", "speedup", *tasks, "avg",
                          "avg_tasks"])


def data_ablation_table(runs: list[Run], tidy: pd.DataFrame, reference_dir=None) -> pd.DataFrame:
    """Tuning-data ablation: the paper's rows (Llama-3-8B), then per kit run with attn
    granularity and a mindskip variant its dense row and its mindskip row labelled with the
    run's tuning data, with Δ vs dense (and Δ vs paper for Llama-3-8B on the same data)."""
    ref = load_reference("data_ablation", reference_dir).copy()
    ref.insert(0, "model", "Llama-3-8B")  # stated in the table's source line
    chosen = _kit_runs(tidy, runs, lambda r: r.granularity == "attn" and _has(tidy, r, "mindskip"))
    tasks, paper_tasks = _table_tasks(ref, tidy, [r.run_id for r in chosen])
    rows = _paper_rows(ref, tasks)
    for run in chosen:
        base = {"source": "kit", "run_id": run.run_id, "model": run.model}
        dense = _dense_scores(tidy, run.run_id, tasks)
        rows.append(_row({**base, "data": "dense"}, "score", tasks, dense["score"] if dense else {}, "",
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
    """Title, table and notes as Markdown. Hand-written: ``DataFrame.to_markdown`` pads and aligns
    every cell, which would rewrite every committed table."""
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
    """A booktabs table. Hand-written: ``Styler.to_latex`` has no rule between the row groups of
    different sources, no ``resizebox`` and escapes Δ and − differently."""
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
             METHOD_NOTE,
             "Kit rows: results/runs/<run>/eval/results.csv, value x 100 (accuracy in percent, the paper's metric per "
             "task where the run has it); the run id is in the source column.",
             "Δ vs dense: kit variant minus the same run's dense model, in points (paired on identical documents "
             "where eval/paired.csv has it). Δ vs paper: kit minus the paper's row for the same model and "
             "configuration, shown only for the paper's own models.",
             f"avg: mean over the paper's task columns a row has; '(k/{n_avg})' marks a kit row with fewer tasks. "
             "Tasks the paper did not report are appended as extra columns and left out of avg.",
             "not run: no result exists for that cell; nothing is filled in from elsewhere."]
    if name == "main_table":
        notes.append("A dense row shared by several kit runs (the same dense scores, e.g. a sweep reusing one "
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



def _eval_settings(tidy: pd.DataFrame, run_ids: list[str]) -> list[str]:
    """One note line: how each kit run's rows were scored (documents and shots per task), so
    rows scored on different documents or shots are not read as comparable."""
    groups: dict[str, list[str]] = {}  # settings -> runs scored that way
    for rid in run_ids:
        sub = tidy[(tidy["run_id"] == rid) & (tidy["method"] == "dense") & ~tidy["task"].isin(NOT_TASKS)]
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

