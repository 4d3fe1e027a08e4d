"""``python -m rt_lib schema docs/results_format.md``: rewrite the page's generated tables from ``rt_lib.runs.schema``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rt_lib.runs.schema import render_doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rt_lib schema",
                                description="Rewrite the generated tables of the results-format page from the "
                                            "kit's schema (rt_lib.runs.schema); the rest of the page is kept.")
    p.add_argument("page", help="the Markdown page, e.g. docs/results_format.md")
    args = p.parse_args(argv)
    path = Path(args.page)
    path.write_text(render_doc(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0
