"""The training command line, ``python -m rt_lib train`` (``rt_lib.tuning.train`` runs it).

    python -m rt_lib train --recipe cpu --out results/runs/<id>
    python -m rt_lib train --recipe paper --plan --gpu-memory 80GiB     # what it needs, no weights loaded

``--preset`` is the deprecated spelling of ``--recipe`` (hidden; it prints a note).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from dataclasses import fields

from rt_lib.cli.flags import add_deprecated_alias
from rt_lib.tuning.config import DEFAULT_RECIPE, TrainConfig, make_config
from rt_lib.tuning.tuner import TrainResult
from rt_lib.tuning.train import run


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``TrainConfig`` field (``--max-steps`` or ``--max_steps``), each defaulting to
    ``None`` so that only the flags given override the recipe; ``--recipe`` defaults to cpu (its
    old spelling ``--preset`` still works, hidden, with a note)."""
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(TrainConfig)
    # The flags' dataclass: TrainConfig's fields and help texts with None defaults (None = the recipe's value).
    options = dataclasses.make_dataclass("TrainOptions", [
        (f.name, hints[f.name], dataclasses.field(default=DEFAULT_RECIPE if f.name == "recipe" else None, metadata=f.metadata))
        for f in fields(TrainConfig)])
    p = HfArgumentParser(options, prog="python -m rt_lib train", formatter_class=argparse.HelpFormatter,
                         description="Router-Tuning: train MindSkip routers on a frozen model.",
                         epilog="--plan [--gpu-memory 80GiB] [--plan-json FILE] [--eval-tokens auto|yes|no]: print "
                                "what the run needs (assets, memory, KV cache, tokens; rt_lib.pipeline.plan) with these "
                                "options, load no weights and exit.")
    # HfArgumentParser adds --no-<flag> only to booleans that default to True; recipes switch them either way.
    for f in fields(TrainConfig):
        if hints[f.name] is bool:
            p.add_argument(f"--no-{f.name.replace('_', '-')}", f"--no_{f.name}", dest=f.name, action="store_false",
                           help=f"Turn --{f.name.replace('_', '-')} off.")
    add_deprecated_alias(p, "--preset", "--recipe", dest="recipe")
    return p


def main(argv: list[str] | None = None) -> TrainResult | None:
    from rt_lib.cli.plan import add_plan_arguments

    plan_flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    plan_flags.add_argument("--plan", action="store_true")
    add_plan_arguments(plan_flags, json_flag="--plan-json")
    planning, rest = plan_flags.parse_known_args(argv)
    args = vars(build_parser().parse_args(rest))
    recipe = args.pop("recipe")
    if planning.plan:
        from rt_lib.pipeline import plan

        status = plan.run(plan.preset_for_recipe(recipe), recipe=recipe, json_path=planning.plan_json,
                          gpu_memory=planning.gpu_memory, eval_tokens=planning.eval_tokens, train_overrides=args)
        if status:
            raise SystemExit(status)
        return None
    if planning.gpu_memory is not None or planning.plan_json is not None:
        print("error: --gpu-memory and --plan-json go with --plan", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = make_config(recipe, **args)
    result = run(cfg)
    s = result.summary
    print(json.dumps({k: s[k] for k in ("steps", "wall_time_s", "peak_memory_mb", "heldout_lm_loss",
                                        "heldout_skip_ratio", "final_capacity")}, indent=1))
    return result

