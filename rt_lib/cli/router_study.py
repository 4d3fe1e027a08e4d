"""The router study's command line, ``python -m rt_lib router-study`` (the study: ``rt_lib.tuning.router_study``)."""

from __future__ import annotations

import argparse
import logging

from rt_lib.tuning import router_study
from rt_lib.tuning.router_study import ORDER, STUDY_RECIPES, tune


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rt_lib router-study", description=router_study.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune", help="tune every recipe (or --only some) into <out>/recipe-<name>")
    t.add_argument("--out", default="results/runs")
    t.add_argument("--only", default=None, help=f"comma-separated recipes (default: all, in the order {', '.join(ORDER)})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = args.only.split(",") if args.only else list(ORDER)
    unknown = [n for n in names if n not in STUDY_RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; recipes: {', '.join(STUDY_RECIPES)}")
    for name in names:
        tune(name, args.out)
    return 0
