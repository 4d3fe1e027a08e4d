"""The evaluation command line, ``python -m rt_lib evaluate`` (``main`` here).

The harness CLI with the ``mindskip`` model registered and the kit's offline
tasks on the include path (importing ``rt_lib.evaluation.driver`` registers the model; the plain
``lm_eval`` entry point does not import the kit, so call it through this module)::

    python -m rt_lib evaluate --model mindskip \\
        --model_args pretrained=smollm2-135m-instruct,routers=results/runs/x/train/routers,threshold=0.5 \\
        --tasks piqa_offline,arc_challenge_offline --batch_size 8 --log_samples --output_path out/

which is ``lm_eval --model mindskip ... --include_path <kit tasks dir>``; write that folder
with ``python -m rt_lib evaluate tasks --out DIR`` to use it with a plain ``lm_eval`` run
(``--model hf`` works with it; ``--model mindskip`` needs the module entry point above).
``pretrained`` is an embedded kit name, a local folder or a hub id (``rt_lib.assets.loading.load_model``);
``routers`` a folder written by ``MindSkipModel.save_pretrained``; ``threshold`` overrides the
checkpoint's. Skip statistics per task land in the output JSON under ``config.mindskip``.

The kit's own run of a task set (``rt_lib.evaluation.tasks.TASK_SETS``), with files per
docs/results_format.md::

    python -m rt_lib evaluate run --pretrained smollm2-135m-instruct --task-set quick \\
        [--routers DIR | --force-skip 20,22,24,26] --out results/runs/<id>

(``evaluate preset`` and ``--preset`` are the deprecated spellings of ``evaluate run`` and
``--task-set``: hidden, they print a note.)

Data-parallel evaluation of large models uses the harness's own mechanism, ``accelerate``
processes that each score every N-th document, results gathered on process 0::

    accelerate launch --num_processes 8 -m rt_lib evaluate --model mindskip \\
        --model_args pretrained=meta-llama/Meta-Llama-3-8B,routers=DIR,dtype=bfloat16 \\
        --tasks arc_challenge --num_fewshot 25 --batch_size 16

Each process loads the model onto its own device; skip counts are summed over processes
(``rt_lib.evaluation.harness``). Without GPUs the same runs on CPU processes (gloo):
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m rt_lib evaluate ...`` (tested).

When ``--tasks`` names only the kit's offline tasks, the harness's own tasks are not indexed
(10-30 s per process); a standard task name among them (or ``--include_path``) indexes them.

Few-shot examples of the kit's offline tasks are drawn per document, so scores do not depend on
the number of processes; the harness's standard tasks run through the CLI use the harness's
sampler, whose draws depend on how documents are dealt to processes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from rt_lib.evaluation.driver import DEFAULT_SEEDS, check_request, evaluate
from rt_lib.evaluation.harness import load_routers, pick_device
from rt_lib.cli.flags import add_deprecated_alias, deprecation_note
from rt_lib.evaluation.tasks import TASK_SETS, write_offline_tasks


def _main_run(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rt_lib evaluate run",
                                 description="Score a kit task set and write <out>/eval/ (docs/results_format.md).")
    ap.add_argument("--pretrained", default="smollm2-135m-instruct")
    ap.add_argument("--routers", default=None, help="router checkpoint folder")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--force-skip", default=None,
                    help="comma-separated layers whose attention is skipped for every input, added to the "
                         "default routed layers whose zero-initialised routers keep everything (hand-set routing)")
    ap.add_argument("--task-set", default="quick", choices=list(TASK_SETS),
                    help="the tasks, shots and documents scored (rt_lib.evaluation.tasks.TASK_SETS)")
    add_deprecated_alias(ap, "--preset", "--task-set", choices=list(TASK_SETS))
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--batch-size", default="1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEEDS["fewshot_random_seed"])
    ap.add_argument("--out", default=None, help="run folder (results/runs/<id>)")
    a = ap.parse_args(argv)
    limit = None if a.limit is None else (int(a.limit) if float(a.limit).is_integer() else a.limit)
    bs = a.batch_size if a.batch_size.startswith("auto") else int(a.batch_size)
    check_request(a.task_set, a.tasks, limit, bs)
    if a.routers and a.force_skip:
        raise SystemExit("--routers and --force-skip are exclusive")
    from rt_lib.assets import loading as assets

    model, tok = assets.load_model(a.pretrained, dtype=a.dtype, device=pick_device(a.device))
    target = model
    if a.routers:
        target = load_routers(model, a.routers)
        if a.threshold is not None:
            target.set_threshold(a.threshold)
    elif a.force_skip:
        # hand-set routing: the default routed layers (zero-initialised routers keep everything)
        # plus the given ones, whose attention is skipped for every input
        from rt_lib.mindskip.config import MindSkipConfig
        from rt_lib.mindskip.architecture import routed_layers_for
        from rt_lib.mindskip.model import get_mindskip_model

        skip = sorted({int(x) for x in a.force_skip.split(",") if x.strip()})
        cfg = MindSkipConfig()
        cfg.routed_layers = sorted(set(routed_layers_for(model, cfg)) | set(skip))
        target = get_mindskip_model(model, cfg)
        target.force({layer: False for layer in skip})
    t0 = time.perf_counter()
    res = evaluate(target, tok, task_set=a.task_set, tasks=a.tasks, limit=limit, batch_size=bs, out_dir=a.out,
                   seed=a.seed, model_name=a.pretrained)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(res.summary().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wall time {time.perf_counter() - t0:.1f} s" + (f"; files in {Path(a.out) / 'eval'}" if a.out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tasks"]:
        import argparse

        ap = argparse.ArgumentParser(prog="python -m rt_lib evaluate tasks",
                                     description="Write the kit's offline task YAMLs (for lm_eval --include_path).")
        ap.add_argument("--out", default=None)
        a = ap.parse_args(argv[1:])
        print(write_offline_tasks(a.out))
        return 0
    if argv[:1] == ["preset"]:
        print(deprecation_note("evaluate preset", "evaluate run"), file=sys.stderr)
        argv = ["run", *argv[1:]]
    if argv[:1] == ["run"]:
        return _main_run(argv[1:])
    # the harness's own CLI, with `mindskip` registered (by this import) and offline tasks included.
    # The harness checks task names before loading the model, but not a limit that scores nothing.
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--limit" and i + 1 < len(argv) else (arg[8:] if arg.startswith("--limit=") else None)
        if value is not None:
            try:
                bad = float(value) <= 0
            except ValueError:
                bad = False  # the harness reports a malformed number itself
            if bad:
                raise ValueError(f"--limit {value} would score no documents; omit it for all, or give a positive number")
    offline_only = False
    if "--tasks" in argv and "--include_path" not in argv:
        offline_only = _names_only_offline_tasks(argv)
        argv += ["--include_path", str(write_offline_tasks())]
    from unittest import mock

    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    class _OfflineTasksOnly(lm_eval.tasks.TaskManager):
        """The harness's task manager without its own tasks indexed (the kit's are on the include path)."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    sys.argv = ["lm_eval", *argv]
    patch = mock.patch.object(lm_eval.tasks, "TaskManager", _OfflineTasksOnly)
    with patch if offline_only else contextlib.nullcontext():
        cli_evaluate()
    return 0


def _names_only_offline_tasks(argv: list[str]) -> bool:
    """Whether ``--tasks`` names only the kit's offline tasks (``rte_offline``, ``mmlu_offline``, a
    subject of it, ...): then the harness's own ~14,000 task YAMLs, which take 10-30 s to index in
    every process, are not indexed."""
    from rt_lib.evaluation.harness import task_manager

    names, in_tasks = [], False
    for arg in argv:
        if arg == "--tasks":
            in_tasks = True
        elif in_tasks and not arg.startswith("-"):
            names += arg.split(",")
        else:
            in_tasks = False
    names = [n for n in names if n]
    return bool(names) and set(names) <= set(task_manager(offline=True).all_tasks)
