"""Paired measures of an evaluation, beside accuracy: per task and macro-averaged.

For each variant paired with dense on the same documents (``<run>/eval/results.json``, whose
per-document records hold the harness's gold choice, predicted choice and every choice's
log-likelihood, see ``rt_lib.evaluation.tables.collect_scores``):

``acc_diff``
    paired accuracy difference (the task's paper metric), t interval over documents;
``gold_logp_diff``
    paired change of the gold choice's log-probability normalised over the choices,
    ``log softmax(ll_choices)[gold]`` (nats; ``ll_choices``: each choice's summed
    log-likelihood), t interval. The same unit for every task, whether its paper metric is
    ``acc`` or ``acc_norm``; it moves with every document, not only those whose answer flips,
    so it resolves smaller effects than accuracy. Records written before the per-choice
    log-likelihoods were stored cannot give it: then it is NaN and ``gold_logp_note`` says why
    (it is never computed from something else);
``flip_rate``
    share of documents whose predicted answer changed, Wilson interval;
``majority_rate``
    share of documents whose gold answer is the most common gold choice index: a model that
    always answers that index scores this. A task whose dense accuracy is not above it
    (``above_chance`` False: the Wilson 95% interval of dense accuracy reaches the majority
    rate) cannot show a cost of skipping, and the macro rows are given with and without it.

Skip ratios: ``skip_ratio`` is the paper's (skipped attention executions / all layers'
executions, i.e. skipped layers / model layers); ``routed_skip_ratio`` the fraction of the
routed layers' executions that were skipped.

Macro rows (``task`` = ``macro_avg`` and ``macro_above_chance``): unweighted means over tasks
with ``se = sqrt(sum se_t^2) / T`` and a normal interval (``rt_lib.evaluation.stats.macro_difference``);
a measure missing on any of the tasks is missing from the macro row too (with the tasks' note).

Held-out loss (``heldout_table``): the per-block LM loss of each variant on the evidence run's
Wikipedia validation blocks, paired with dense per block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special as scipy_special
from scipy import stats as scipy_stats

from rt_lib.evaluation import stats

MACRO = "macro_avg"
MACRO_ABOVE_CHANCE = "macro_above_chance"
MEASURE_COLUMNS = [
    "variant", "method", "threshold", "k", "task", "metric", "n", "majority_rate", "dense_value", "above_chance",
    "value", "acc_diff", "acc_ci_low", "acc_ci_high", "acc_se", "gold_logp_diff", "gold_logp_ci_low",
    "gold_logp_ci_high", "gold_logp_se", "gold_logp_note", "flip_rate", "flip_ci_low", "flip_ci_high", "flip_se", "skip_ratio", "routed_skip_ratio", "skipped_layers",
]
HELDOUT_COLUMNS = [
    "variant", "method", "granularity", "route_level", "threshold", "k", "skipped_layers", "skip_ratio", "n_blocks",
    "loss", "loss_diff", "ci_low", "ci_high", "se",
]


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    ci = scipy_stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _by_key(docs: dict, field: str) -> dict:
    return {tuple(k): v for k, v in zip(docs["keys"], docs.get(field, [])) if v is not None}


def majority_rate(docs: dict) -> float:
    golds = [g for g in docs.get("gold", []) if g is not None]
    if not golds:
        return math.nan
    return max(np.bincount(golds)) / len(golds)


NO_CHOICE_LLS = ("the per-document records hold no per-choice log-likelihoods (ll_choices; written before "
                 "they were stored): not computed")


def gold_logprob(ll_choices, gold: int) -> float:
    """Log-probability of the gold choice normalised over the choices:
    ``log softmax(ll_choices)[gold] = ll_gold - logsumexp(ll_choices)`` (nats, at most 0)."""
    lls = np.asarray(ll_choices, dtype=np.float64)
    return float(lls[int(gold)] - scipy_special.logsumexp(lls))


def _gold_logprobs(docs: dict) -> tuple[dict | None, str]:
    """``({doc key: normalised gold log-probability}, "")``, or ``(None, why)`` when the records
    lack the choices' log-likelihoods (or a document lacks its gold)."""
    choices, golds = docs.get("ll_choices"), docs.get("gold")
    if not choices or len(choices) != len(docs["keys"]):
        return None, NO_CHOICE_LLS
    lacking = sum(c is None or g is None for c, g in zip(choices, golds or [None] * len(choices)))
    if lacking:
        return None, f"{lacking} of {len(choices)} documents have no choice record: not computed"
    return {tuple(k): gold_logprob(c, g) for k, c, g in zip(docs["keys"], choices, golds)}, ""


def task_measures(var_docs: dict, dense_docs: dict, metric: str, confidence: float = 0.95) -> dict:
    """The paired measures of one variant on one task (see the module docstring)."""
    norm = metric == "acc_norm"
    keys, x, y = stats.pair_scores(_by_key(var_docs, metric), _by_key(dense_docs, metric))
    acc = stats.paired_difference(x, y, confidence=confidence)
    out = {"metric": metric, "n": len(keys), "value": float(x.mean()), "dense_value": float(y.mean()),
           "acc_diff": acc.diff, "acc_ci_low": acc.ci_low, "acc_ci_high": acc.ci_high, "acc_se": acc.se}
    pred_field = "pred_norm" if norm else "pred"
    if "gold" in var_docs and "gold" in dense_docs:
        (lv, why_v), (ld, why_d) = _gold_logprobs(var_docs), _gold_logprobs(dense_docs)
        if lv is not None and ld is not None:
            _, lx, ly = stats.pair_scores(lv, ld)
            lp = stats.paired_difference(lx, ly, confidence=confidence)
            out.update({"gold_logp_diff": lp.diff, "gold_logp_ci_low": lp.ci_low, "gold_logp_ci_high": lp.ci_high,
                        "gold_logp_se": lp.se, "gold_logp_note": ""})
        else:
            out.update(_missing("gold_logp", why_v or why_d))
        _, px, py = stats.pair_scores(_by_key(var_docs, pred_field), _by_key(dense_docs, pred_field))
        flips = int((px != py).sum())
        lo, hi = wilson(flips, len(px), confidence)
        rate = flips / len(px)
        out.update({"flip_rate": rate, "flip_ci_low": lo, "flip_ci_high": hi,
                    "flip_se": math.sqrt(rate * (1 - rate) / len(px)),
                    "majority_rate": majority_rate(dense_docs)})
    else:
        out.update(_missing("gold_logp", "the per-document records hold no choice records (gold): not computed"))
    return out


def _missing(measure: str, why: str) -> dict:
    return {f"{measure}_diff": math.nan, f"{measure}_ci_low": math.nan, f"{measure}_ci_high": math.nan,
            f"{measure}_se": math.nan, f"{measure}_note": why}


def _macro(rows: list[dict], label: str, confidence: float) -> dict:
    """Unweighted mean over task rows, normal interval from the per-task standard errors; a
    measure missing on any task is missing here too."""
    z = float(scipy_stats.norm.ppf(0.5 + confidence / 2))
    out = {"task": label, "metric": "paper", "n": int(sum(r["n"] for r in rows))}
    for f in ("value", "dense_value", "majority_rate", "skip_ratio", "routed_skip_ratio", "skipped_layers"):
        vals = [r.get(f) for r in rows]
        out[f] = float(np.mean(vals)) if all(v is not None and v == v for v in vals) else math.nan
    for m in ("acc", "gold_logp", "flip"):
        key = "flip_rate" if m == "flip" else f"{m}_diff"
        vals, ses = [r.get(key, math.nan) for r in rows], [r.get(f"{m}_se", math.nan) for r in rows]
        mean = float(np.mean(vals))
        se = math.sqrt(sum(s * s for s in ses)) / len(ses)
        out.update({key: mean, f"{m}_ci_low": mean - z * se, f"{m}_ci_high": mean + z * se, f"{m}_se": se})
    notes = sorted({r["gold_logp_note"] for r in rows if r.get("gold_logp_note")})
    out["gold_logp_note"] = "; ".join(notes)
    return out


def evidence_measures(run_dir: str | Path, confidence: float = 0.95, num_layers: int | None = None) -> pd.DataFrame:
    """``measures.csv`` of a run folder: one row per (variant, task) and the two macro rows."""
    run_dir = Path(run_dir)
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    per_doc, tasks = res["per_doc"], res["tasks"]
    from rt_lib.evaluation.results import routed_count, with_variant_columns

    from rt_lib.runs.read import skip_ratio_of_all_layers

    num_layers = num_layers or res["provenance"].get("num_layers") or _num_layers(run_dir)
    table = skip_ratio_of_all_layers(with_variant_columns(pd.DataFrame(res["results"])),
                                     res["provenance"].get("skip_ratio_of"), num_layers,
                                     routed_count(res["provenance"]), str(run_dir / "eval" / "results.json"))
    dense = per_doc["dense"]
    rows = []
    for variant in [v for v in per_doc if v != "dense"]:
        task_rows = []
        for task in tasks:
            if task not in per_doc[variant] or task not in dense:
                continue
            r = task_measures(per_doc[variant][task], dense[task], tasks[task]["metric"], confidence)
            t = table[(table.variant == variant) & (table.task == task)]
            ratio = float(t.skip_ratio.iloc[0]) if len(t) and pd.notna(t.skip_ratio.iloc[0]) else math.nan
            r.update(_skip(variant, t.iloc[0] if len(t) else None, ratio, res, num_layers))
            lo, _ = wilson(round(r["dense_value"] * r["n"]), r["n"], confidence)
            r["above_chance"] = bool(lo > r.get("majority_rate", math.nan)) if r.get("majority_rate") == r.get(
                "majority_rate") else True
            r["task"] = task
            task_rows.append(r)
        if not task_rows:
            continue
        macro = [_macro(task_rows, MACRO, confidence)]
        above = [r for r in task_rows if r["above_chance"]]
        if above and len(above) < len(task_rows):
            macro.append(_macro(above, MACRO_ABOVE_CHANCE, confidence))
        for r in task_rows + macro:
            r.update(_variant_fields(variant, table))
            rows.append(r)
    return pd.DataFrame(rows).reindex(columns=MEASURE_COLUMNS)


def _num_layers(run_dir: Path) -> int | None:
    """The model's layer count, from the router checkpoint named by the evidence plan."""
    plan = run_dir / "evidence" / "plan.json"
    if not plan.exists():
        return None
    routers = Path(json.loads(plan.read_text())["routers"])
    if not routers.is_absolute() and not routers.exists():
        routers = run_dir.resolve().parents[2] / routers  # relative to the kit root
    cfg = routers / "mindskip_config.json"
    return int(json.loads(cfg.read_text())["num_layers"]) if cfg.exists() else None


def _skip(variant: str, row, ratio: float, res: dict, num_layers: int | None) -> dict:
    """Skipped layers per sequence, the paper's skip ratio (``ratio``: results.csv's, of all
    layers) and the fraction of the routed layers' executions skipped."""
    if row is not None and row.method == "static_drop":
        k = int(row.k)
        return {"skipped_layers": float(k), "skip_ratio": k / num_layers if num_layers else math.nan,
                "routed_skip_ratio": math.nan}
    n_routed = None
    for part in res.get("provenance", {}).get("parts", [res.get("provenance", {})]):
        if part.get("variant") == variant and part.get("mindskip"):
            n_routed = len(part["mindskip"]["routed_layers"])
    skipped = ratio * num_layers if num_layers else math.nan
    return {"skipped_layers": skipped, "skip_ratio": ratio,
            "routed_skip_ratio": skipped / n_routed if n_routed else math.nan}


def _variant_fields(variant: str, table: pd.DataFrame) -> dict:
    t = table[table.variant == variant]
    thr = t.threshold.dropna()
    k = t.k.dropna()
    return {"variant": variant, "method": t.method.iloc[0], "threshold": float(thr.iloc[0]) if len(thr) else None,
            "k": int(k.iloc[0]) if len(k) else None}


def heldout_table(evidence_dir: str | Path, num_layers: int, confidence: float = 0.95) -> pd.DataFrame:
    """One row per variant of ``<evidence>/heldout/*.json``: mean block loss and its paired
    difference to dense over the same blocks."""
    folder = Path(evidence_dir) / "heldout"
    found = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    if "dense" not in found:
        return pd.DataFrame(columns=HELDOUT_COLUMNS)
    dense = np.array(found["dense"]["losses"])
    rows = []
    for name, d in found.items():
        losses = np.array(d["losses"])
        row = {"variant": name, "method": d.get("method"), "granularity": d.get("granularity"),
               "route_level": d.get("route_level"), "threshold": d.get("threshold"), "k": d.get("k"),
               "skipped_layers": d.get("skipped"), "skip_ratio": (d.get("skipped") or 0.0) / num_layers,
               "n_blocks": len(losses), "loss": float(losses.mean())}
        if name != "dense":
            p = stats.paired_difference(losses, dense, confidence=confidence)
            row.update({"loss_diff": p.diff, "ci_low": p.ci_low, "ci_high": p.ci_high, "se": p.se})
        else:
            row.update({"loss_diff": 0.0})
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=HELDOUT_COLUMNS)


def paired_loss_difference(evidence_dir: str | Path, a: str, b: str, confidence: float = 0.95):
    """Held-out loss of variant ``a`` minus variant ``b``, paired per block."""
    folder = Path(evidence_dir) / "heldout"
    la = np.array(json.loads((folder / f"{a}.json").read_text())["losses"])
    lb = np.array(json.loads((folder / f"{b}.json").read_text())["losses"])
    return stats.paired_difference(la, lb, confidence=confidence)
