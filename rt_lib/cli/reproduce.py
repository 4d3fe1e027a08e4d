"""`make reproduce`: the whole reproduction in one command.

    python -m rt_lib reproduce --preset cpu [--run-id ID] [--out results/runs] [-p name=value ...]

Executes the notebooks in order with papermill (rt_lib.pipeline.notebooks): 01 tunes the routers,
02 evaluates dense / MindSkip / static drop, 03 profiles speed and KV memory, 04 rebuilds the
paper's tables and figures from result files. Everything lands in one run folder
`<out>/<run-id>/` (executed notebooks under `notebooks/`); tables and figures of the `cpu` and
`paper` presets go to `results/tables` and `results/figures`.

Presets (`notebooks/presets/<name>.json`): `smoke` (tiny random model, under 2 minutes, used
by the tests), `cpu` (embedded SmolLM2-135M-Instruct, about 30 minutes on 2 cores), `paper`
(the paper's models and settings, GPU). `-p` overrides a parameter, `notebook.name=value` or
`name=value` for every notebook that declares it; values are JSON. Unknown names or wrong
types fail before anything runs, with the list of valid parameters (`--list-parameters`).

Sweeps run the tuning, evaluation and profiling notebooks once per combination, each in its
own run folder, then the paper notebook once over all of them:

    python -m rt_lib reproduce --preset cpu --sweep granularity=attn,mlp,block --sweep route_level=seq,token

Rerunning into an existing run folder (`--run-id`): a notebook whose step (01 train, 02 eval,
03 profile) already completed there is refused before anything runs, naming what it would
replace. `--replace` moves those results to `<run>/replaced/<step>-<time>/` and moves aside the
results of later steps that used them, marking them stale in run.json (rerun 02/03 to refresh
them; the paper tables leave stale runs out). A step that was interrupted resumes without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from rt_lib.pipeline import notebooks as pipeline

log = logging.getLogger(__name__)


def _parse_sweep(items: list[str]) -> list[dict]:
    """`name=v1,v2` items -> list of override dicts (cartesian product); values are JSON."""
    axes = []
    for item in items:
        if "=" not in item:
            raise pipeline.ParameterError(f"--sweep {item!r} is not of the form name=v1,v2,...")
        name, raw = item.split("=", 1)
        values = []
        for v in raw.split(","):
            try:
                values.append(json.loads(v))
            except json.JSONDecodeError:
                values.append(v)
        axes.append([(name, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _label(combo: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in combo.items()).replace("/", "_")


def list_parameters() -> str:
    lines = []
    for nb in pipeline.NOTEBOOKS:
        lines.append(nb)
        for name, spec in pipeline.declared_parameters(nb).items():
            lines.append(f"  {name}: {spec['inferred_type_name']} = {spec['default']}  # {spec['help']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rt_lib reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--preset", default="cpu", help="smoke | cpu | paper (notebooks/presets/<name>.json)")
    parser.add_argument("--run-id", default=None, help="run folder name (default: <time>-<preset>)")
    parser.add_argument("--out", default="results/runs", help="parent folder of run folders")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="[NOTEBOOK.]NAME=VALUE",
                        help="override a notebook parameter (JSON value); repeatable")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                        help="run 01-03 once per value (cartesian product over repeated --sweep)")
    parser.add_argument("--notebooks", default=None, help="comma list of notebooks to run (default: all)")
    parser.add_argument("--list-parameters", action="store_true", help="print every notebook parameter and exit")
    parser.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    parser.add_argument("--replace", action="store_true",
                        help="rerun steps that already completed in the run folder: move their results and those of "
                             "later steps that used them to <run>/replaced/<step>-<time>/ (later steps become stale)")
    parser.add_argument("--plan", action="store_true",
                        help="print what the run needs (assets, memory per step, KV cache, tokens; rt_lib.pipeline.plan) "
                             "without loading weights, and exit")
    from rt_lib.cli.plan import add_plan_arguments

    add_plan_arguments(parser, json_flag="--plan-json")
    return parser


def _jobs(args, overrides: dict, combos: list[dict], sweep_overrides: list[dict], selected: list[str] | None) -> list:
    """(run id, overrides, notebooks, sweep combination) per pipeline run: a sweep runs 01-03 per
    combination in its own folder, then the paper notebook once (it reads every run folder)."""
    if not args.sweep:
        return [(args.run_id, overrides, selected, None)]
    base_id = args.run_id or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{args.preset}"
    per_run = [nb for nb in (selected or pipeline.NOTEBOOKS) if nb != pipeline.NOTEBOOKS[-1]]
    jobs = [(f"{base_id}-{_label(c)}", {nb: {**overrides.get(nb, {}), **so.get(nb, {})} for nb in pipeline.NOTEBOOKS},
             per_run, c) for c, so in zip(combos, sweep_overrides)]
    if selected is None or pipeline.NOTEBOOKS[-1] in selected:
        jobs.append((jobs[-1][0], overrides, [pipeline.NOTEBOOKS[-1]], None))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list_parameters:
        print(list_parameters())
        return 0

    from rt_lib.runs import record as runs
    from rt_lib.runs import steps as run_steps

    try:
        preset = pipeline.load_preset(args.preset)
        overrides = pipeline.parse_overrides(args.param)
        combos = _parse_sweep(args.sweep)
        sweep_overrides = [pipeline.parse_overrides([f"{k}={json.dumps(v)}" for k, v in c.items()]) for c in combos]
        for so in sweep_overrides:  # validate every combination before anything executes
            merged = {nb: {**preset.get(nb, {}), **overrides.get(nb, {}), **so.get(nb, {})} for nb in pipeline.NOTEBOOKS}
            pipeline.validate(merged)
        selected = [pipeline.match_notebook(n) for n in args.notebooks.split(",")] if args.notebooks else None
    except pipeline.ParameterError as e:
        parser.exit(2, f"error: {e}\n")
    if args.plan:
        from rt_lib.pipeline import plan

        return plan.run(args.preset, json_path=args.plan_json, gpu_memory=args.gpu_memory,
                        eval_tokens=args.eval_tokens, notebook_overrides=overrides)

    jobs = _jobs(args, overrides, combos, sweep_overrides, selected)
    try:  # refuse before anything runs (or run.json is touched) if a run folder holds completed results
        for run_id, _, notebooks, _ in jobs:
            if run_id is not None:
                pipeline.check_run_folder(Path(args.out) / run_id, notebooks, args.replace)
    except run_steps.ResultsExist as e:
        parser.exit(2, f"error: {e}\n")
    t0 = time.perf_counter()
    times_all, failed = [], []
    for k, (run_id, ov, notebooks, combo) in enumerate(jobs):
        record = {"preset": args.preset, "overrides": ov, **({"sweep": combo} if combo else {})}
        run_dir = runs.new_run(args.out, run_id=run_id, preset=args.preset,
                               parameters={"pipeline": record} if (combo or not args.sweep) else {})
        print(f"run folder: {run_dir}" + (f"  ({_label(combo)})" if combo else ""))
        try:
            times = pipeline.run_pipeline(args.preset, run_dir, ov, notebooks, progress=not args.no_progress,
                                          replace=args.replace)
        except run_steps.ResultsExist as e:  # the folder changed since the check above
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        except pipeline.NotebookFailure as e:
            print(f"\nFAILED: {e}", file=sys.stderr)
            if not combo:
                return 1
            # one failed combination of a sweep does not cost the others; reported at the end
            failed.append((run_dir.name, str(e).splitlines()[0]))
            continue
        times_all += [(run_dir.name, nb, sec) for nb, sec in times.items()]
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    for run_id, nb, sec in times_all:
        print(f"  {run_id} {nb}: {sec:.0f} s")
    for run_id, why in failed:
        print(f"  FAILED {run_id}: {why}", file=sys.stderr)
    return 1 if failed else 0

