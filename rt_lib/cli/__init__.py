"""The command line: ``python -m rt_lib <command> [options]``, one launcher for every command.

``main`` dispatches on the first argument to the command's own ``main`` (each imported only
when its command runs, so ``--help`` stays cheap); ``evaluate`` is the harness command line of
``rt_lib.cli.evaluate``. No library package imports this one. May import every package before
it in ``rt_lib.LAYERS``.
"""

from __future__ import annotations

import importlib
import sys


# command -> what it does; each command's code is the module rt_lib.cli.<command> (dashes as
# underscores), imported only when that command runs
COMMANDS = {
    "train": "train MindSkip routers (Router-Tuning) into a run folder",
    "evaluate": "lm-evaluation-harness with the mindskip model and the kit's offline tasks",
    "profile": "speed and KV-cache memory of MindSkip beside the oracle",
    "evidence": "the evidence run that decides the paper's claims",
    "frontier": "held-out loss against skipped layers: router recipes vs static drops",
    "paper": "rebuild the paper's tables, figures and claims from result files",
    "plan": "what a pipeline preset will need (assets, memory, tokens) before loading weights",
    "reproduce": "the whole reproduction: notebooks 01-04 into one run folder",
    "router-study": "the router recipe study (tune every recipe, resumable)",
    "schema": "write or check docs/results_format.md from the file schema",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m rt_lib <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, about in COMMANDS.items()]
    lines += ["", "python -m rt_lib <command> --help shows a command's options; python -m rt_lib --debug <command> ...",
              "keeps the traceback of an error."]
    return "\n".join(lines)


# What bad input raises (a wrong value, a missing or unreadable file, an unknown name): answered
# with one line and exit status 2. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, KeyError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; bad input gives one line on stderr and status 2 (``--debug``, before
    the command name, keeps the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[1:] if debug else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        command = importlib.import_module(f"rt_lib.cli.{name.replace('-', '_')}")
        result = command.main(rest)
    except INPUT_ERRORS as e:
        if debug:
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(text.split())} (python -m rt_lib --debug {name} ... shows the traceback)",
              file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
