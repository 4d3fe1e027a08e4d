"""The tables of an evaluation, from the harness's output: results.csv and paired.csv rows with
their macro averages, and the per-document records (``collect_scores``) that pairing and
``rt_lib.evaluation.measures`` read. ``rt_lib.evaluation.driver`` runs the harness; this module only turns what
it returned into the kit's tables (docs/results_format.md)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import pandas as pd

from rt_lib.evaluation import stats
from rt_lib.evaluation.results import PAIRED_COLUMNS, RESULT_COLUMNS, add_macro_paired, add_macro_rows


def task_paired_rows(variant: str, task: str, var_docs: dict, ref_docs: dict, metrics: list[str], confidence: float,
                 interval: str, seed: int) -> list[dict]:
    """paired.csv rows of one task: the variant's per-document difference to the dense reference,
    after checking that both saw the same prompt for every document."""
    ref_hash = {tuple(k): h for k, h in zip(ref_docs["keys"], ref_docs["prompt_hash"])}
    bad = [tuple(k) for k, h in zip(var_docs["keys"], var_docs["prompt_hash"]) if ref_hash.get(tuple(k), h) != h]
    if bad:
        raise ValueError(
            f"{task}: {len(bad)} documents were shown different prompts to the variant and the dense "
            f"reference (e.g. {bad[:3]}); re-run the dense reference with the same task set, shots and seed"
        )
    rows = []
    for m in metrics:
        if m not in var_docs or m not in ref_docs:
            continue
        v = {tuple(k): s for k, s in zip(var_docs["keys"], var_docs[m])}
        r = {tuple(k): s for k, s in zip(ref_docs["keys"], ref_docs[m])}
        _, x, y = stats.pair_scores(v, r)
        pdiff = stats.paired_difference(x, y, confidence=confidence, method=interval, seed=seed)
        rows.append({"variant": variant, "task": task, "metric": m, "diff": pdiff.diff,
                     "ci_low": pdiff.ci_low, "ci_high": pdiff.ci_high, "n": pdiff.n,
                     "confidence": confidence, "se": pdiff.se, "method": pdiff.method})
    return rows


def results_table(rows: list[dict], names: list[str], task_info: dict, threshold):
    """results.csv: the rows, plus per variant the macro average over the tasks' paper metrics
    (when every task has one and there are several tasks)."""
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"n": "Int64", "num_fewshot": "Int64", "k": "Int64"})
    return add_macro_rows(table, names, task_info)


def paired_table(paired_rows: list[dict], names: list[str], task_info: dict, variant: str, confidence: float):
    """paired.csv: the rows, plus the macro-averaged difference over the tasks' paper metrics."""
    paired = pd.DataFrame(paired_rows)
    if not len(paired):
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    return add_macro_paired(paired, names, task_info)


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _choice_scores(task, sample: dict) -> dict | None:
    """Per document, what the harness's multiple-choice scoring decided, from its logged
    sample: the gold choice, the predicted choice (raw and per-character log-likelihood, the
    ``acc``/``acc_norm`` rules of ``ConfigurableTask.process_results``), the gold choice's
    log-likelihood (raw and per character), every choice's log-likelihood (``ll_choices``,
    nats, in the task's choice order) and the length ``acc_norm`` divides each by
    (``choice_chars``, characters of the choice). None for other output types or a gold the
    harness could not place among the choices."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or getattr(task, "multiple_target", False):
        return None
    doc = sample["doc"]
    choices = task.doc_to_choice(doc)
    lls = [float(r[0]) for r in sample["filtered_resps"]][: len(choices)]
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -1
    if not isinstance(gold, int) or not 0 <= gold < len(choices) or len(lls) != len(choices):
        return None
    lens = [float(len(c)) for c in choices]
    per_char = [ll / n for ll, n in zip(lls, lens)]
    return {"gold": gold, "pred": max(range(len(lls)), key=lls.__getitem__),
            "pred_norm": max(range(len(per_char)), key=per_char.__getitem__),
            "ll_gold": lls[gold], "ll_gold_norm": per_char[gold], "ll_choices": lls, "choice_chars": lens}


# per-document fields of a multiple-choice task (``ll_choices`` and ``choice_chars`` are lists, one
# value per choice; records written before they were stored lack them)
CHOICE_FIELDS = ("gold", "pred", "pred_norm", "ll_gold", "ll_gold_norm", "ll_choices", "choice_chars")


def collect_scores(res: dict, harness_name: str, metrics: Sequence[str], tasks: dict | None = None) -> tuple[dict, dict, int]:
    """(metric -> (value, stderr), per-doc table, n) of one task/group from harness results.
    With ``tasks`` (leaf name -> harness task) the per-doc table also holds ``CHOICE_FIELDS``."""
    r = res["results"][harness_name]
    values = {}
    for m in metrics:
        if f"{m},none" in r:
            values[m] = (_float(r[f"{m},none"]), _float(r.get(f"{m}_stderr,none")))
    keys, hashes, per_metric, choice = [], [], defaultdict(list), defaultdict(list)
    for leaf in sorted(res.get("samples", {})):
        for s in sorted(res["samples"][leaf], key=lambda s: s["doc_id"]):
            keys.append([leaf, int(s["doc_id"])])
            hashes.append(s.get("prompt_hash"))
            for m in metrics:
                if m in s:
                    per_metric[m].append(float(s[m]))
            c = _choice_scores(tasks[leaf], s) if tasks and leaf in tasks else None
            for f in CHOICE_FIELDS:
                choice[f].append(None if c is None else c[f])
    per_doc = {"keys": keys, "prompt_hash": hashes, **per_metric}
    if any(v is not None for v in choice.get("gold", [])):
        per_doc.update(choice)
    for m, (v, se) in list(values.items()):
        xs = per_metric.get(m, [])
        if math.isnan(se) and len(xs) > 1:
            # the harness gives a group no stderr when a subtask has a single document (quick
            # MMLU); the group value is the mean over its documents, so use theirs
            mean = sum(xs) / len(xs)
            values[m] = (v, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)))
    return values, per_doc, len(keys)
