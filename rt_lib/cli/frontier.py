"""The frontier's command line, ``python -m rt_lib frontier`` (the frontier: ``rt_lib.evidence.frontier``)."""

from __future__ import annotations

import argparse
import logging

from rt_lib.evidence import frontier
from rt_lib.evidence.frontier import LEVELS, Frontier


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rt_lib frontier", description=frontier.__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="frontier run folder (parts under <out>/frontier/)")
    p.add_argument("--routers", action="append", default=[], metavar="NAME=FOLDER[@K]",
                   help="a router set to place on the frontier (repeat); NAME labels its curve; @K (or @K1+K2) "
                        "places it at those skipped-layer levels only (a set tuned for one operating point)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="skipped layers to calibrate to")
    p.add_argument("--combine-only", action="store_true", help="rebuild frontier.csv from the parts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    routers = {}
    for item in args.routers:
        name, sep, path = item.partition("=")
        if not sep or not name:
            p.error(f"--routers takes NAME=FOLDER, got {item!r}")
        routers[name] = path
    levels = [int(x) for x in args.levels.split(",") if x]
    fr = Frontier(args.out, routers, model=args.model, dtype=args.dtype, levels=levels)
    path = fr.combine() if args.combine_only else fr.run()
    print(f"frontier table: {path}")
    return 0
