"""The paper's command line, ``python -m rt_lib paper`` (what it builds: ``rt_lib.paper.build``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rt_lib.paper import build
from rt_lib.paper.build import build_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rt_lib paper", description=build.__doc__.splitlines()[0])
    p.add_argument("--results", default="results", help="results folder holding runs/ and reference/")
    p.add_argument("--tables", default=None, help="output folder for tables (default <results>/tables)")
    p.add_argument("--figures", default=None, help="output folder for figures (default <results>/figures)")
    p.add_argument("--regime", default="prefill", choices=["prefill", "decode"], help="profile regime for speedups")
    p.add_argument("--no-figures", action="store_true", help="build the tables only")
    p.add_argument("--pdf", action="store_true", help="also save every figure as PDF (default: PNG only)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a run folder was left out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rt_lib").setLevel(logging.INFO)
    root = Path(args.results)
    out = build_all(root, args.tables or root / "tables", args.figures or root / "figures", regime=args.regime,
                    figures=not args.no_figures, pdf=args.pdf)
    for kind in ("tables", "figures"):
        for name, paths in out[kind].items():
            print(f"{kind[:-1]:6s} {name}: " + ", ".join(str(p) for p in paths))
    for line in out["problems"]:
        print(f"left out: {line}", file=sys.stderr)
    return 1 if args.strict and out["problems"] else 0
