"""``python -m rt_lib schema docs/results_format.md``: rewrite the page's generated tables from ``rt_lib.runs.schema``."""

from __future__ import annotations

import sys
from pathlib import Path

from rt_lib.runs.schema import render_doc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rt_lib schema docs/results_format.md  (rewrites its generated tables)", file=sys.stderr)
        return 2
    path = Path(args[0])
    path.write_text(render_doc(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0
