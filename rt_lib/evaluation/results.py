"""``EvalResults``: the tables of one evaluation, their files under ``<run>/eval/`` and back.

``results.csv`` (scores per variant, task and metric, with the macro average ``macro_avg``, and
each routed or static-drop variant's skip ratio: skipped sublayer executions / all layers'
executions, ``rt_lib.runs.read.SKIP_RATIO_OF``; files written when it was of the routed layers
are converted on loading),
``paired.csv`` (each variant's paired difference to dense on the same documents),
``skip_stats.csv`` (executed fraction per routed layer and task) and ``results.json`` (all of
it plus per-document scores and provenance); columns in docs/results_format.md.

    res = EvalResults.load("results/runs/cpu-main")      # a run folder, its eval/ folder or the file
    res.summary(); res.doc_scores("dense", "piqa", "acc_norm")
    EvalResults.combine([dense.only(["dense"]), mindskip, static_drop]).save(run_dir)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_COLUMNS = ["variant", "method", "k", "task", "metric", "value", "stderr", "n", "num_fewshot", "threshold",
                  "skip_ratio"]
METHODS = ("dense", "mindskip", "static_drop")  # the kit's methods; a caller may name others (e.g. lora)
PAIRED_COLUMNS = ["variant", "task", "metric", "diff", "ci_low", "ci_high", "n", "confidence"]
SKIP_COLUMNS = ["variant", "task", "layer", "executed_fraction"]
MACRO = "macro_avg"


@dataclass
class EvalResults:
    """Tables of one evaluation (docs/results_format.md) plus per-document scores."""

    task_set: str  # the name in rt_lib.evaluation.tasks.TASK_SETS
    table: Any  # pandas DataFrame, results.csv
    paired: Any  # paired.csv
    skip_stats: Any  # skip_stats.csv
    per_doc: dict[str, dict[str, dict[str, dict]]]  # variant -> task -> {"keys", metric lists, "prompt_hash"}
    tasks: dict[str, dict]  # task -> settings (harness task, shots, limit, metric, splits, fewshot source)
    provenance: dict
    wall_time_s: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> task -> s
    harness: dict = field(default_factory=dict)  # variant -> task -> harness results (no samples)

    def doc_scores(self, variant: str, task: str, metric: str) -> dict[tuple[str, int], float]:
        d = self.per_doc[variant][task]
        return {tuple(k): v for k, v in zip(d["keys"], d[metric])}

    def summary(self):
        """Wide table: one row per task; value, stderr (and skip ratio) per variant; each variant's
        paired difference to dense with its confidence interval."""
        import pandas as pd

        t = self.table
        metric_of = {k: v["metric"] for k, v in self.tasks.items()}
        rows = []
        macro = [MACRO] if (t.task == MACRO).any() else []  # one task: no macro average
        for task in [*self.tasks, *macro]:
            metric = metric_of.get(task, "paper")
            row = {"task": task, "metric": metric}
            for _, r in t[(t.task == task) & (t.metric == metric)].iterrows():
                row[r.variant] = r.value
                row[f"{r.variant}_stderr"] = r.stderr
                if r.variant != "dense" and r.skip_ratio == r.skip_ratio and r.skip_ratio is not None:
                    row[f"{r.variant}_skip_ratio"] = r.skip_ratio
            p = self.paired
            if len(p):
                for _, r in p[(p.task == task) & (p.metric == metric)].iterrows():
                    row[f"{r.variant}-dense"] = r["diff"]
                    row[f"{r.variant}-dense ci"] = f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        return {
            "task_set": self.task_set,
            "provenance": self.provenance,
            "tasks": self.tasks,
            "results": _records(self.table),
            "paired": _records(self.paired),
            "skip_stats": _records(self.skip_stats),
            "wall_time_s": self.wall_time_s,
            "per_doc": self.per_doc,
            "harness": self.harness,
        }

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``<run_dir>/eval/{results,paired,skip_stats}.csv`` and ``results.json``; record in run.json."""
        from rt_lib import files
        from rt_lib.runs import record as runs

        run_dir = Path(run_dir)
        if not (run_dir / runs.RUN_FILE).exists():
            runs.new_run(root=run_dir.parent, run_id=run_dir.name)
        eval_dir = run_dir / "eval"
        files.write_csv(eval_dir / "results.csv", self.table, RESULT_COLUMNS)
        files.write_csv(eval_dir / "paired.csv", self.paired, PAIRED_COLUMNS)
        files.write_csv(eval_dir / "skip_stats.csv", self.skip_stats, SKIP_COLUMNS)
        files.atomic_write_json(eval_dir / "results.json", self.to_json(), indent=None)  # per-document records: compact
        runs.update_run(run_dir, "eval", {
            "variants": sorted(set(self.table.variant)) if len(self.table) else [],
            "wall_time_s": {v: round(sum(t.values()), 2) for v, t in self.wall_time_s.items()},
            "files": ["eval/results.csv", "eval/paired.csv", "eval/skip_stats.csv", "eval/results.json"],
        }, parameters=self.options())
        return eval_dir

    def options(self) -> dict:
        """What the evaluation ran with, as run.json records it (``parameters.eval``): task set,
        model and its dtype, tasks, per-task document limits, batch size, seed, interval
        confidence, when routers were evaluated their MindSkip config, and the model's layer
        count with the unit of the skip ratios (``num_layers``, ``skip_ratio_of``)."""
        prov = self.provenance
        called = prov.get("parameters") or {}
        mindskip = next((q["mindskip"]["config"] for q in (prov, *prov.get("parts", ()))
                         if (q.get("mindskip") or {}).get("config")), None)  # combined: any part's routers
        return {"task_set": self.task_set, "model": prov.get("model"), "model_dtype": prov.get("model_dtype"),
                "tasks": list(self.tasks), **{k: v for k, v in called.items() if k != "tasks"},
                "confidence": prov.get("confidence"), **({"mindskip": mindskip} if mindskip else {}),
                **{k: prov[k] for k in ("num_layers", "skip_ratio_of") if prov.get(k) is not None}}

    def only(self, variants: Sequence[str], tasks: Sequence[str] | None = None) -> "EvalResults":
        """The same result restricted to some variants (and tasks), e.g. a run's dense scores to
        reuse as the dense reference of another run on the same documents."""
        missing = [v for v in variants if v not in self.per_doc]
        if missing:
            raise ValueError(f"no variant(s) {missing} in these results (have {sorted(self.per_doc)})")
        tasks = list(self.tasks) if tasks is None else list(tasks)
        absent = [t for t in tasks if t not in self.tasks]
        if absent:
            raise ValueError(f"no task(s) {absent} in these results (have {list(self.tasks)})")

        kept_tasks = tasks + ([MACRO] if len(tasks) == len(self.tasks) else [])  # a subset has no macro

        def keep(frame):
            return frame[frame.variant.isin(list(variants)) & frame.task.isin(kept_tasks)].reset_index(drop=True)

        def sub(d):
            return {v: {t: x for t, x in d[v].items() if t in tasks} for v in variants if v in d}

        return EvalResults(task_set=self.task_set, table=keep(self.table), paired=keep(self.paired),
                           skip_stats=keep(self.skip_stats), per_doc=sub(self.per_doc),
                           tasks={t: self.tasks[t] for t in tasks}, provenance=dict(self.provenance),
                           wall_time_s=sub(self.wall_time_s), harness=sub(self.harness))

    @classmethod
    def combine(cls, parts: Sequence["EvalResults"]) -> "EvalResults":
        """One result from evaluations of several variants and tasks of one task set (e.g. MindSkip
        at several thresholds and static drop, each paired with the same dense run; or one part
        per variant and task). A task in several parts must have been scored on the same
        documents in each. Rows of a (variant, task) present in several parts are kept once
        (first); a variant without a macro average in any part gets one over the combined tasks."""
        import pandas as pd

        if not parts:
            raise ValueError("nothing to combine")
        first = parts[0]

        def docs(task: dict):  # what decides which documents and prompts are scored
            return tuple(str(task.get(k)) for k in ("limit", "num_fewshot", "metric", "sample"))

        tasks: dict = {}
        for p in parts:
            if p.task_set != first.task_set:
                raise ValueError(f"can only combine evaluations of one task set; got {first.task_set} and {p.task_set}")
            for t, info in p.tasks.items():
                if t in tasks and docs(tasks[t]) != docs(info):
                    raise ValueError(f"can only combine evaluations that scored {t} on the same documents "
                                     f"({docs(tasks[t])} vs {docs(info)})")
                tasks.setdefault(t, info)
        names = list(tasks)
        table = pd.concat([p.table for p in parts], ignore_index=True).drop_duplicates(
            subset=["variant", "task", "metric"], keep="first", ignore_index=True)
        paired = pd.concat([p.paired for p in parts], ignore_index=True).drop_duplicates(
            subset=["variant", "task", "metric"], keep="first", ignore_index=True)
        # a variant whose parts each scored some of the tasks gets its macro average here
        split = [v for v in dict.fromkeys(table.variant) if not ((table.variant == v) & (table.task == MACRO)).any()]
        table = add_macro_rows(table, names, tasks, split)
        split_p = [v for v in dict.fromkeys(paired.variant) if not ((paired.variant == v) & (paired.task == MACRO)).any()]
        paired = add_macro_paired(paired, names, tasks, split_p) if len(paired) else paired
        skip = pd.concat([p.skip_stats for p in parts], ignore_index=True).drop_duplicates(
            subset=["variant", "task", "layer"], keep="first", ignore_index=True)
        merged = {"per_doc": {}, "wall_time_s": {}, "harness": {}}
        for p in parts:
            for attr, acc in merged.items():
                for variant, value in getattr(p, attr).items():
                    into = acc.setdefault(variant, {})
                    for task, v in value.items():
                        into.setdefault(task, v)
        provenance = dict(first.provenance)
        provenance["parts"] = [p.provenance for p in parts]
        return cls(task_set=first.task_set, table=table, paired=paired, skip_stats=skip, per_doc=merged["per_doc"],
                   tasks=tasks, provenance=provenance, wall_time_s=merged["wall_time_s"],
                   harness=merged["harness"])

    @classmethod
    def load(cls, path: str | os.PathLike, num_layers: int | None = None) -> "EvalResults":
        """Read ``results.json`` (a run folder, its eval/ folder or the file) back, e.g. as a dense
        reference. A file written when skip ratios were of the routed layers gets them of all
        layers (``rt_lib.runs.read.skip_ratio_of_all_layers``), which needs the model's layer
        count: ``num_layers`` (else the ratios are left empty)."""
        import pandas as pd

        from rt_lib.runs.read import SKIP_RATIO_OF, skip_ratio_of_all_layers

        path = Path(path)
        if path.is_dir():
            path = path / "results.json" if (path / "results.json").exists() else path / "eval" / "results.json"
        d = json.loads(path.read_text())
        prov = d["provenance"]
        table = with_variant_columns(pd.DataFrame(d["results"], columns=[
            c for c in RESULT_COLUMNS if c not in ("method", "k") or any(c in r for r in d["results"])])
        ).reindex(columns=RESULT_COLUMNS)
        written_of = prov.get("skip_ratio_of")
        if written_of is None:
            num_layers = num_layers or prov.get("num_layers")
            prov = {**prov, "skip_ratio_of": SKIP_RATIO_OF, **({"num_layers": num_layers} if num_layers else {})}
        table = skip_ratio_of_all_layers(table, written_of, num_layers, routed_count(d["provenance"]), str(path))
        return cls(
            task_set=d["task_set"] if "task_set" in d else d["preset"],  # "preset": files written before the rename
            table=table,
            paired=pd.DataFrame(d["paired"], columns=PAIRED_COLUMNS),
            skip_stats=pd.DataFrame(d["skip_stats"], columns=SKIP_COLUMNS),
            per_doc=d["per_doc"],
            tasks=d["tasks"],
            provenance=prov,
            wall_time_s=d.get("wall_time_s", {}),
            harness=d.get("harness", {}),
        )


def routed_count(provenance: dict) -> int | None:
    """Number of routed layers of the routers an evaluation (or any of its parts) scored."""
    for q in (provenance, *provenance.get("parts", ())):
        layers = (q.get("mindskip") or {}).get("routed_layers")
        if layers:
            return len(layers)
    return None


def legacy_variant_columns(variant: str) -> tuple[str, int | None]:
    """``(method, k)`` of a label written before results.csv had these columns: ``dense``,
    ``mindskip[_t<threshold>]``, ``static_drop[_k<k>]``; other labels are their own method."""
    v = str(variant)
    for method in ("static_drop", "mindskip", "dense"):
        if v.startswith(method):
            k = v.rsplit("_k", 1)[1] if method == "static_drop" and "_k" in v else None
            return method, int(k) if k is not None and k.isdigit() else None
    return v, None


def with_variant_columns(table):
    """``table`` with ``method`` and ``k`` filled for rows that lack them (files written before
    the columns existed); rows that have them are left as they are."""
    table = table.copy()
    if "variant" not in table:
        table["variant"] = None
    for col in ("method", "k"):
        if col not in table:
            table[col] = None
    missing = table["method"].isna()
    if missing.any():
        legacy = table.loc[missing, "variant"].map(legacy_variant_columns)
        table.loc[missing, "method"] = legacy.map(lambda x: x[0])
        table.loc[missing & table["k"].isna(), "k"] = legacy.map(lambda x: x[1])
    table["k"] = table["k"].astype("Int64")
    return table


def _records(frame) -> list[dict]:
    if frame is None or not len(frame):
        return []
    return json.loads(frame.to_json(orient="records"))


def add_macro_rows(table, names: list[str], task_info: dict, variants=None):
    """``table`` (results.csv rows) with, per variant scored on every task of ``names``, the
    macro average over the tasks' paper metrics (a variant's threshold from its task rows).
    ``variants``: recompute only these (default: all); the others keep their rows."""
    from rt_lib.evaluation import stats

    variants = list(dict.fromkeys(table.variant)) if variants is None else list(variants)
    table = table[(table.task != MACRO) | ~table.variant.isin(variants)].reset_index(drop=True)
    for label in variants:
        rows_t = table[(table.variant == label)]
        threshold = rows_t.threshold.dropna().iloc[0] if rows_t.threshold.notna().any() else None
        sel = [table[(table.variant == label) & (table.task == t) & (table.metric == task_info[t]["metric"])]
               for t in names]
        sel = [s.iloc[0] for s in sel if len(s)]
        if len(sel) == len(names) and len(names) > 1:
            skips = [s.skip_ratio for s in sel if s.skip_ratio is not None and s.skip_ratio == s.skip_ratio]
            table.loc[len(table)] = {
                "variant": label, "method": sel[0].method, "k": sel[0].k,
                "task": MACRO, "metric": "paper", "value": sum(s.value for s in sel) / len(sel),
                "stderr": stats.macro_stderr([s.stderr for s in sel]), "n": int(sum(s.n for s in sel)),
                "num_fewshot": None, "threshold": threshold if label != "dense" else None,
                "skip_ratio": (sum(skips) / len(skips)) if skips else None,
            }
    return table


def add_macro_paired(paired, names: list[str], task_info: dict, variants=None):
    """``paired`` with, per variant paired on every task of ``names``, the macro-averaged
    difference over the tasks' paper metrics. ``variants``: recompute only these (default: all)."""
    from rt_lib.evaluation import stats

    variants = list(dict.fromkeys(paired.variant)) if variants is None else list(variants)
    paired = paired[(paired.task != MACRO) | ~paired.variant.isin(variants)].reset_index(drop=True)
    for variant in variants:
        parts, confidence = [], None
        for t in names:
            s = paired[(paired.variant == variant) & (paired.task == t) & (paired.metric == task_info[t]["metric"])]
            if len(s):
                r = s.iloc[0]
                confidence = float(r.confidence)
                se = r.get("se")
                if se is None or se != se:  # read back from paired.csv: the t interval's half-width
                    se = stats.se_from_interval(r.ci_low, r.ci_high, int(r.n), confidence)
                parts.append(stats.PairedDifference(r["diff"], r.ci_low, r.ci_high, int(r.n), se, confidence,
                                                    r.get("method", "t")))
        if len(parts) == len(names) and len(names) > 1:
            m = stats.macro_difference(parts, confidence)
            paired.loc[len(paired)] = {"variant": variant, "task": MACRO, "metric": "paper", "diff": m.diff,
                                       "ci_low": m.ci_low, "ci_high": m.ci_high, "n": m.n, "confidence": confidence,
                                       "se": m.se, "method": m.method}
    return paired
