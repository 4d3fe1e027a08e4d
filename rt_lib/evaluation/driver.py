"""Evaluate dense and MindSkip models with lm-evaluation-harness 0.4.x: the driver.

``evaluate`` scores a model in memory (a dense HF model or a ``MindSkipModel``) on a task
set through the harness model ``MindSkipLM`` (``rt_lib.evaluation.harness``, registered as
``mindskip``), pairs it with its dense reference and returns ``EvalResults``
(``rt_lib.evaluation.results``, the files under ``<run>/eval/``)::

    from rt_lib.evaluation.driver import evaluate
    res = evaluate(ms, tok, task_set="quick", out_dir="results/runs/my-run")
    res.table; res.paired; res.skip_stats          # also written to my-run/eval/

For a ``MindSkipModel`` the dense reference is the same model with every router forced to
"keep" (``ms.force(True)``, exactly the base model), run on the same documents and prompts;
``paired`` holds the per-document paired difference with its confidence interval.

Command line (``python -m rt_lib evaluate``: the harness CLI with the kit's model and
tasks, or a kit task set written as a run folder): ``rt_lib.cli.evaluate``.

Few-shot examples of the kit's offline tasks are drawn per document
(``rt_lib.evaluation.tasks.samplers.DocSeededSampler``), so scores do not depend on the number of
processes; the harness's standard tasks run through the CLI use the harness's sampler,
whose draws depend on how documents are dealt to processes (``evaluate()`` swaps in the
per-document sampler for them too). An in-memory model is always evaluated in one process.

A threshold sweep with static drop matched to each threshold (notebook 02): ``rt_lib.evaluation.sweep``.
Task sets and what differs offline: ``rt_lib.evaluation.tasks``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rt_lib.evaluation.results import SKIP_COLUMNS, EvalResults
from rt_lib.evaluation.tables import collect_scores, paired_table, results_table, task_paired_rows
from rt_lib.evaluation.harness import (
    MindSkipLM,
    env_info_once,
    leaf_tasks,
    load_task,
    routers_sha256,
    task_manager,
)
from rt_lib.mindskip.architecture import find_decoder
from rt_lib.mindskip.model import MindSkipModel
from rt_lib.runs.read import SKIP_RATIO_OF
from rt_lib.files import file_sha256
from rt_lib.evaluation.tasks import PAPER_TASKS, TaskSet, task_set as lookup_task_set

log = logging.getLogger(__name__)

DEFAULT_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


# ------------------------------------------------------------------------- input checks
def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def check_request(task_set: str, tasks: Sequence[str] | None, limit: Any, batch_size: Any) -> tuple[TaskSet, list[str]]:
    """Validate task set/tasks/limit/batch size before anything is loaded or run."""
    p = lookup_task_set(task_set)
    if tasks is None:
        names = p.tasks
    else:
        if isinstance(tasks, str):
            tasks = [t for t in tasks.split(",") if t]
        names = [t.removesuffix("_offline") for t in tasks]
        unknown = [t for t, n in zip(tasks, names) if n not in p.shots]
        if unknown:
            raise ValueError(
                f"unknown task(s) {unknown} for task set {task_set!r}; choose from {', '.join(p.tasks)} "
                "(the paper's eight benchmarks; other harness tasks: use the lm_eval CLI through "
                "`python -m rt_lib evaluate`)"
            )
        if not names:
            raise ValueError("tasks is empty; pass None for all tasks of the task set")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tasks in {list(tasks)}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise ValueError(f"limit must be a positive number of documents (or a fraction in (0, 1)), got {limit!r}")
        if limit <= 0:
            raise ValueError(f"limit={limit} would score no documents; use limit=None for all, or a positive number")
        if isinstance(limit, float) and limit > 1 and not limit.is_integer():
            raise ValueError(f"limit={limit}: give a whole number of documents or a fraction in (0, 1)")
    if isinstance(batch_size, str):
        if not batch_size.startswith("auto"):
            raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if not p.offline and (_truthy_env("HF_HUB_OFFLINE") or _truthy_env("HF_DATASETS_OFFLINE")):
        raise ValueError(
            f"task set {task_set!r} loads the standard datasets from the Hugging Face hub, but "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: use task set 'offline' (same prompts and "
            "metrics over the embedded data) or run where the hub is reachable"
        )
    return p, names


# ------------------------------------------------------------------------- evaluate()
@dataclass
class _HarnessRun:
    """One harness call: one variant scored on one task (or group)."""

    values: dict[str, tuple[float, float]]  # metric -> (value, stderr)
    n: int  # documents scored
    docs: dict  # per document: "keys", "prompt_hash", one score list per metric
    wall_s: float
    harness: dict  # the harness's results without samples and config


@dataclass
class _Job:
    """What every harness call of one ``evaluate`` shares."""

    lm: MindSkipLM
    ms: MindSkipModel | None  # the routed model, None for a plain model
    tm: Any  # the harness TaskManager
    batch_size: int | str
    seed: int


def evaluate(
    model_or_ms,
    tokenizer,
    task_set: str = "quick",
    tasks: Sequence[str] | str | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    out_dir: str | os.PathLike | None = None,
    variant: str | None = None,
    dense_reference: EvalResults | str | os.PathLike | bool | None = None,
    *,
    seed: int = DEFAULT_SEEDS["fewshot_random_seed"],
    confidence: float = 0.95,
    interval: str = "t",
    model_name: str | None = None,
    method: str | None = None,
    k: int | None = None,
    preset: str | None = None,
    **lm_kwargs,
) -> EvalResults:
    """Evaluate an in-memory model on a task set's tasks; see the module docstring.

    ``model_or_ms``: a dense HF causal LM or a ``MindSkipModel``. ``task_set``: a name of
    ``rt_lib.evaluation.tasks.TASK_SETS`` (``preset=`` is its deprecated spelling). ``tasks``: a
    subset of the task set's (standard names). ``limit``: documents per task (MMLU: per subject);
    default the task set's. ``variant``: label of the model in the tables (default ``mindskip`` for a
    MindSkipModel, ``dense`` otherwise). ``dense_reference``: None -> for a MindSkipModel,
    also run it with every router forced to keep and pair with that; an ``EvalResults`` (or
    its path) from an earlier dense run of the same task set/tasks/limit/seed -> pair with it;
    False -> no dense run, no pairing. ``interval``: ``t`` or ``bootstrap``. Skip ratios in the
    tables are of all the model's layers (``rt_lib.runs.read.SKIP_RATIO_OF``): a MindSkip model's
    realised skipped executions of its routed sublayers / all layers' executions; a static drop
    (``method="static_drop"`` with ``k``) ``k`` / layers. ``method`` and
    ``k``: the variant's columns in results.csv (default: ``mindskip`` for a MindSkipModel,
    ``dense`` for the dense label, else the label; ``k``: layers a static drop removes, or the
    skipped-layer target of a MindSkip operating point). Remaining
    keyword arguments go to ``MindSkipLM``/HFLM (e.g. ``max_length``).
    """
    if preset is not None:
        warnings.warn("evaluate(preset=...) is deprecated; pass task_set=...", DeprecationWarning, stacklevel=2)
        task_set = preset
    # every check before the harness starts
    p, names = check_request(task_set, tasks, limit, batch_size)
    _check_options(model_or_ms, tokenizer, confidence, interval)
    ms = model_or_ms if isinstance(model_or_ms, MindSkipModel) else None
    variant = variant or ("mindskip" if ms is not None else "dense")
    method = method or ("dense" if variant == "dense" else "mindskip" if ms is not None else variant)
    limits = {t: (limit if limit is not None else p.limits.get(t)) for t in names}
    reference = _dense_reference(dense_reference, task_set, p, names, limits, seed)
    run_dense = variant == "dense" or (dense_reference is None and ms is not None)
    if variant != "dense" and dense_reference is None and ms is None:
        log.warning("variant %r is a plain model and no dense_reference was given: no paired differences", variant)

    lm = MindSkipLM(pretrained=model_or_ms, tokenizer=tokenizer, batch_size=batch_size, **lm_kwargs)
    lm.skip_stats_per_task = False  # one task (or group) per harness call below
    job = _Job(lm, ms, task_manager(p.offline), batch_size, seed)
    model_name = _same_model(reference, model_name or lm.model_name)
    threshold = ms.config.threshold if ms is not None else None
    num_layers = len(find_decoder(lm._model)[1])
    task_info: dict[str, dict] = {}
    rows, paired_rows, skip_rows = [], [], []
    per_doc, wall, harness_out = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for task in names:
        harness_name, obj = load_task(job.tm, p, task)
        task_info[task], samples = _task_documents(p, task, harness_name, obj, limits[task])
        metrics = ["acc", "acc_norm"] if PAPER_TASKS[task].metric == "acc_norm" else ["acc"]
        call = (obj, p.shots[task], limits[task], harness_name, metrics, samples)
        runs = {"dense": _run_dense(job, *call)} if run_dense else {}
        skip_ratio = None
        if variant != "dense":
            runs[variant] = _run_harness(job, *call)
            if ms is not None:
                skip_rows += [{"variant": variant, "task": task, "layer": layer, "executed_fraction": frac}
                              for layer, frac in lm.capacities().items()]
                # the paper's skip ratio: skipped executions of the routed sublayers / all layers'
                skip_ratio = task_info[task]["skip_ratio"] = lm.skip_ratio() * len(ms.routed_layers) / num_layers
            elif method == "static_drop" and k is not None:
                skip_ratio = task_info[task]["skip_ratio"] = k / num_layers  # k of the model's layers removed
        for label, run in runs.items():
            per_doc[label][task], wall[label][task], harness_out[label][task] = run.docs, run.wall_s, run.harness
            cols = ("dense", None) if label == "dense" else (method, k)
            rows += _score_rows(label, cols, task, run, p.shots[task], threshold, skip_ratio)
        ref = (runs["dense"].docs if "dense" in runs
               else reference.per_doc["dense"][task] if reference is not None else None)
        if ref is not None and variant != "dense":
            paired_rows += task_paired_rows(variant, task, runs[variant].docs, ref, metrics, confidence, interval, seed)

    table = results_table(rows, names, task_info, threshold)
    paired = paired_table(paired_rows, names, task_info, variant, confidence)
    skip_frame = pd.DataFrame(skip_rows, columns=SKIP_COLUMNS)
    prov = _provenance(lm, ms, model_name, task_set, p, names, limits, batch_size, seed, variant, confidence, interval,
                       task_info)
    prov.update({"num_layers": num_layers, "skip_ratio_of": SKIP_RATIO_OF})
    result = EvalResults(task_set, table, paired, skip_frame, dict(per_doc), task_info, prov, dict(wall),
                         dict(harness_out))
    if out_dir is not None:
        result.save(out_dir)
    return result


def _task_documents(p: TaskSet, task: str, harness_name: str, obj, limit) -> tuple[dict, dict | None]:
    """A task's settings record (``EvalResults.tasks``) and the harness's ``samples`` argument."""
    info = _task_info(p, task, harness_name, obj, limit)
    samples = harness_samples(p, obj, limit)
    info["sample"] = None if samples is None else {
        "n": sum(len(v) for v in samples.values()), "seed": p.sample_seed,
        "of": sum(len(t.eval_docs) for t in leaf_tasks(obj))}
    log.info("%s (%s): %d-shot, %s", task, harness_name, p.shots[task],
             f"limit {limit}" if samples is None else f"seeded sample of {info['sample']['n']}")
    return info, samples


def _check_options(model_or_ms, tokenizer, confidence: float, interval: str) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if interval not in ("t", "bootstrap"):
        raise ValueError(f"interval must be 't' or 'bootstrap', got {interval!r}")
    if not isinstance(model_or_ms, (MindSkipModel, torch.nn.Module)):
        raise ValueError(f"model_or_ms must be an HF model or a MindSkipModel, got {type(model_or_ms)}")
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer")


def _dense_reference(dense_reference, task_set: str, p: TaskSet, names: list[str], limits: dict,
                     seed: int) -> EvalResults | None:
    """The earlier dense run to pair with (loaded if given as a path), checked to have scored the
    same documents with the same prompts; None when there is none."""
    if isinstance(dense_reference, (str, os.PathLike)):
        dense_reference = EvalResults.load(dense_reference)
    if not isinstance(dense_reference, EvalResults):
        return None
    reference = dense_reference
    if "dense" not in reference.per_doc:
        raise ValueError("dense_reference holds no 'dense' variant")
    if reference.task_set != task_set:
        raise ValueError(f"dense_reference was run with task set {reference.task_set!r}, not {task_set!r}")
    missing = [t for t in names if t not in reference.per_doc["dense"]]
    if missing:
        raise ValueError(f"dense_reference lacks tasks {missing}; evaluate the dense model on them first")
    for t in names:
        ref_t = reference.tasks[t]
        if ref_t["limit"] != limits[t] or ref_t["num_fewshot"] != p.shots[t] or (
                ref_t.get("sample") is not None and ref_t.get("sample", {}).get("n") != p.sample):
            raise ValueError(
                f"dense_reference scored {t} with limit {ref_t['limit']} and {ref_t['num_fewshot']} shots, "
                f"this run uses limit {limits[t]} and {p.shots[t]} shots: pass the same limit"
            )
    ref_seed = reference.provenance.get("seeds", {}).get("fewshot_random_seed")
    if ref_seed != seed:
        raise ValueError(f"dense_reference used fewshot seed {ref_seed}, this run {seed}: prompts would differ")
    return reference


def _same_model(reference: EvalResults | None, model_name: str) -> str:
    """``model_name``, after checking that the dense reference was scored on the same model."""
    ref_model = reference.provenance.get("model") if reference is not None else None
    if ref_model is not None and ref_model != model_name:
        raise ValueError(f"dense_reference was scored on model {ref_model!r}, this run evaluates {model_name!r}: "
                         "pair only runs of the same base model")
    return model_name


def _task_info(p: TaskSet, task: str, harness_name: str, obj, limit) -> dict:
    """What results.json records about how a task was scored."""
    spec = PAPER_TASKS[task]
    shots = p.shots[task]
    return {
        "harness_task": harness_name,
        "metric": spec.metric,
        "num_fewshot": shots,
        "limit": limit,
        "eval_split": spec.offline_split if p.offline else spec.standard_split,
        "fewshot_source": spec.fewshot_source(p.offline, shots),
        "leaf_tasks": [t.task_name for t in leaf_tasks(obj)],
    }


def harness_samples(p: TaskSet, task_obj, limit) -> dict[str, list[int]] | None:
    """The harness's ``samples`` argument for a task set that scores a seeded sample (None: the
    first ``limit`` documents, or all). An explicit limit wins over the task set's sample."""
    if p.sample is None or limit is not None:
        return None
    from rt_lib.evaluation.tasks import sample_documents

    return sample_documents({t.task_name: len(t.eval_docs) for t in leaf_tasks(task_obj)}, p.sample, p.sample_seed)


def _run_harness(job: _Job, task_obj, shots: int, limit, harness_name: str, metrics: list[str],
                 samples: dict | None = None) -> _HarnessRun:
    """Score ``job.lm`` as it is on one task (or group) with per-document logs."""
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    job.lm.reset_skip_counts()
    with env_info_once():
        res = simple_evaluate(
            model=job.lm, tasks=[task_obj], num_fewshot=shots, limit=limit, samples=samples,
            batch_size=job.batch_size, log_samples=True, task_manager=job.tm, bootstrap_iters=1000,
            **_seeds(job.seed),
        )
    wall_s = time.perf_counter() - start
    values, docs, n = collect_scores(res, harness_name, metrics, {t.task_name: t for t in leaf_tasks(task_obj)})
    return _HarnessRun(values, n, docs, wall_s, {k: v for k, v in res.items() if k not in ("samples", "config")})


def _run_dense(job: _Job, *call) -> _HarnessRun:
    """The dense reference: a MindSkip model with every router forced to keep (exactly the base
    model), through exactly HFLM's calls; the routers' own forcing is restored afterwards."""
    ms = job.ms
    if ms is None:
        return _run_harness(job, *call)
    saved = {i: g.forced for i, g in ms.gates.items()}
    ms.force(True)
    job.lm.mindskip = None
    try:
        return _run_harness(job, *call)
    finally:
        job.lm.mindskip = ms
        ms.force(saved)


def _score_rows(label: str, cols: tuple, task: str, run: _HarnessRun, shots: int, threshold,
                skip_ratio) -> list[dict]:
    """results.csv rows of one variant on one task, one per metric (dense: no threshold, no skip
    ratio); ``cols``: the variant's (method, k)."""
    if label == "dense":
        threshold = skip_ratio = None
    return [{"variant": label, "method": cols[0], "k": cols[1], "task": task, "metric": m, "value": v, "stderr": se,
             "n": run.n, "num_fewshot": shots, "threshold": threshold, "skip_ratio": skip_ratio}
            for m, (v, se) in run.values.items()]


def _seeds(fewshot_seed: int) -> dict:
    return {**DEFAULT_SEEDS, "fewshot_random_seed": fewshot_seed}


def _provenance(lm, ms, model_name, task_set, p, names, limits, batch_size, seed, variant, confidence, interval, task_info) -> dict:
    import lm_eval

    from rt_lib.runs import record as runs

    prov = runs.provenance()
    model = lm._model
    prov.update({
        "model": model_name,
        "model_source": getattr(model.config, "rt_kit_source", None),
        "model_dtype": str(next(model.parameters()).dtype),
        "task_set": task_set,
        "task_set_description": p.description,
        "harness": "lm-evaluation-harness",
        "harness_version": getattr(lm_eval, "__version__", None) or runs._version("lm_eval"),
        "seeds": _seeds(seed),
        "fewshot_sampler": "rt_lib.evaluation.tasks.samplers.DocSeededSampler (per document); MMLU: first_n",
        "batch_size": batch_size,
        "variant": variant,
        "confidence": confidence,
        "interval": interval,
        # what a sequence router decided from (rt_lib.evaluation.harness.ROUTING_INPUTS); records
        # written before the option existed are "context+continuation"
        "routing_input": lm.routing_input,
        "fewshot_source": {t: task_info[t]["fewshot_source"] for t in names},
        "parameters": {"tasks": list(names), "limits": limits, "batch_size": batch_size, "seed": seed},
    })
    if ms is not None:
        forced = {str(i): (g.forced if isinstance(g.forced, (bool, type(None))) else "per-row tensor")
                  for i, g in ms.gates.items()}
        prov["mindskip"] = {
            "routers_sha256": getattr(lm, "routers_path", None) and file_sha256(Path(lm.routers_path) / "routers.safetensors"),
            "router_weights_sha256": routers_sha256(ms),
            "threshold": ms.config.threshold,
            "routed_layers": list(ms.routed_layers),
            "config": ms.config.to_dict(),
            "forced": forced if any(v is not None for v in forced.values()) else None,
        }
    return prov
