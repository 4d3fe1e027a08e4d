"""The evaluation step of a run (notebook 02): dense, MindSkip at each threshold, and static
attention drop matched to each threshold's realised number of skipped layers.

    ckpt = resolve_checkpoint(run_dir)                        # rt_lib.runs.checkpoints
    base, tok = load_model(ckpt.model)
    results = evaluate_sweep(base, tok, ckpt.run_dir, routers=ckpt.routers, thresholds=[0.4, 0.5])

Every variant scores the same documents with the same prompts and is paired with one dense
run (the routers forced to keep, or the dense scores of another run: ``dense_from``). Variant
labels in the tables: ``dense``; ``mindskip`` for a single threshold, else ``mindskip_t<τ>``;
``static_drop_k<k>``. Files written (docs/results_format.md): ``<run>/eval/`` and, per matched
layer count, ``<run>/baselines/static_drop.json`` (the first threshold's match) or
``static_drop_k<k>.json`` (the others').

Static drop removes attention sublayers, so it is matched only to routers of ``attn``
granularity. ``k`` is MindSkip's macro-averaged realised number of skipped layers (its skip
ratio times the model's layers), rounded; ``k = 0`` is the dense model and is not run. Skip
ratios in the tables are of all the model's layers for both: MindSkip's realised skipped
executions / all layers' executions, static drop's ``k`` / layers (it may remove any layer but
the first, routed or not).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from rt_lib.tuning.baselines import STATIC_DROP_FILE, attention_importance, static_attention_drop
from rt_lib.mindskip.architecture import find_decoder
from rt_lib.runs.checkpoints import attach_routers
from rt_lib.evaluation.results import MACRO, EvalResults
from rt_lib.evaluation.driver import evaluate

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- labels
FRESH = "mindskip_fresh"  # method and variant name of untrained (zero-initialised) routers


def mindskip_variant(threshold: float, n_thresholds: int, fresh: bool = False) -> str:
    """``mindskip`` when only one threshold is evaluated, else ``mindskip_t<threshold>``;
    ``mindskip_fresh...`` for untrained routers, which the paper's tables never take for tuned ones."""
    name = FRESH if fresh else "mindskip"
    return name if n_thresholds == 1 else f"{name}_t{threshold:g}"


def static_drop_variant(k: int) -> str:
    return f"static_drop_k{k}"


def static_drop_file(k: int, first: bool) -> str:
    """File of a static drop choice under ``baselines/``: the first matched threshold's keeps
    the usual name ``static_drop.json``, the others are ``static_drop_k<k>.json``."""
    return STATIC_DROP_FILE if first else f"static_drop_k{k}.json"


# ------------------------------------------------------------------------- the sweep
def check_thresholds(thresholds) -> list[float]:
    """The thresholds as a list; a ValueError unless a non-empty list of numbers."""
    if not thresholds or not all(isinstance(t, (int, float)) for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty list of numbers, got {thresholds!r}")
    return list(thresholds)


def evaluate_sweep(base, tokenizer, run_dir: str | os.PathLike, *, routers: str | os.PathLike | None = None,
                   thresholds: Sequence[float] = (0.5,), task_set: str = "quick", tasks: Sequence[str] | None = None,
                   limit: int | float | None = None, batch_size: int | str = 8, static_drop: bool = True,
                   dense_from: str | os.PathLike | None = None, calibration: dict | None = None) -> EvalResults:
    """Evaluate dense, MindSkip at each of ``thresholds`` and the matched static drops; write
    ``<run_dir>/eval/`` and ``<run_dir>/baselines/`` and return the combined results.

    ``base``: the base model (left as it was: routers and dropped layers are removed again);
    ``routers``: a router checkpoint folder, None for fresh default routers (their rows are
    method ``mindskip_fresh``, so nothing reads them as tuned MindSkip). ``task_set``,
    ``tasks``, ``limit``, ``batch_size``: as ``rt_lib.evaluation.driver.evaluate``. ``dense_from``: a
    run folder whose dense scores (same task set, tasks, limit) are reused instead of a dense
    run. ``calibration``: keyword arguments of ``rt_lib.tuning.baselines.attention_importance``
    (default: its calibration text).
    """
    thresholds = check_thresholds(thresholds)
    run_dir = Path(run_dir)
    common = dict(task_set=task_set, tasks=tasks, limit=limit, batch_size=batch_size)
    ms = attach_routers(base, routers)
    ms.eval()
    try:
        parts = _mindskip_parts(ms, tokenizer, thresholds, dense_from, common, fresh=routers is None)
        granularity = ms.config.granularity
        num_layers = len(find_decoder(ms.model)[1])
    finally:
        ms.unload()
    if static_drop and granularity != "attn":
        log.warning("static drop removes attention sublayers; these routers gate %s sublayers, so the matched "
                    "comparison does not apply: not run", granularity)
    elif static_drop:
        ks = matched_layer_counts(parts, num_layers)
        drops = _static_drop_parts(base, tokenizer, run_dir, ks, parts[0], common, calibration or {})
        parts += [part for _, part in drops]
    results = EvalResults.combine(parts)
    # static drop has no gates to count: its skip ratio is removed layers / all layers, the definition
    # of MindSkip's realised ratio (skipped attention executions / all layers')
    is_drop = results.table.method == "static_drop"
    if is_drop.any():
        results.table.loc[is_drop, "skip_ratio"] = (results.table.loc[is_drop, "k"].astype(float) / num_layers)
    results.save(run_dir)
    return results


def _mindskip_parts(ms, tokenizer, thresholds: list[float], dense_from, common: dict,
                    fresh: bool = False) -> list[EvalResults]:
    """The dense reference (reused from ``dense_from``, else run with the first threshold) and
    MindSkip at each threshold, each paired with that dense run."""
    parts = []
    if dense_from:
        # dense scores of another run on the same documents (checked: task set, tasks, limits, shots, seed, model)
        parts.append(EvalResults.load(dense_from).only(["dense"], tasks=common["tasks"]))
        log.info("dense scores reused from %s", dense_from)
    for tau in thresholds:
        ms.set_threshold(tau)
        # without dense_from the first call also runs the dense reference (routers forced to keep)
        parts.append(evaluate(ms, tokenizer, variant=mindskip_variant(tau, len(thresholds), fresh),
                              method=FRESH if fresh else None, dense_reference=parts[0] if parts else None,
                              **common))
    return parts


def matched_layer_counts(parts: Sequence[EvalResults], num_layers: int) -> list[int]:
    """Static drop's ``k`` per threshold: the realised macro-averaged skip ratio (of all layers) of
    each routed variant times ``num_layers``, rounded; distinct values in the thresholds' order."""
    realised = {}
    for part in parts:
        for _, r in part.table.query(f"variant != 'dense' and task == '{MACRO}'").iterrows():
            realised[r.threshold] = r.skip_ratio
            log.info("threshold %g: realised skip ratio %.3f (%.2f of %d layers)", r.threshold, r.skip_ratio,
                     r.skip_ratio * num_layers, num_layers)
    return list(dict.fromkeys(int(round(s * num_layers)) for s in realised.values()))


def _static_drop_parts(base, tokenizer, run_dir: Path, ks: list[int], dense: EvalResults, common: dict,
                       calibration: dict) -> list[tuple[int, EvalResults]]:
    """Static attention drop of each ``k`` layers, evaluated against ``dense``; the importance
    scores are computed once, each choice is saved under ``baselines/`` before it runs."""
    scores = calib = None
    out = []
    for k in ks:
        if k == 0:
            log.warning("a threshold skipped no layer on average: static drop with k=0 is the dense model, not run")
            continue
        if scores is None:
            scores, calib = attention_importance(base, tokenizer, **calibration)
        drop = static_attention_drop(base, k, tokenizer, scores=scores, scored_on=calib)
        drop.save(run_dir / "baselines" / static_drop_file(k, first=not out))
        log.info("static drop of k=%d layers: %s", k, drop.layers)
        try:
            out.append((k, evaluate(base, tokenizer, variant=static_drop_variant(k), method="static_drop", k=k,
                                      dense_reference=dense, **common)))
        finally:
            drop.restore()
    return out


def operating_points(results: EvalResults):
    """One row per evaluated variant (its macro average): ``method``, ``accuracy`` (percent),
    ``skip_ratio``, ``threshold``; the input of ``rt_lib.plots.plot_accuracy_vs_speedup``."""
    t = results.table.query(f"task == '{MACRO}'").copy()
    t["accuracy"] = 100 * t["value"]
    return t[["method", "accuracy", "skip_ratio", "threshold"]]
