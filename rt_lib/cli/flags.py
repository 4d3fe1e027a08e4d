"""Old spellings of command-line flags that still work: hidden from ``--help``, they store into the
new flag's destination and print a one-line note on stderr.

    add_deprecated_alias(parser, "--preset", "--task-set", choices=list(TASK_SETS))
"""

from __future__ import annotations

import argparse
import sys


def deprecation_note(old: str, new: str) -> str:
    return f"note: {old} is deprecated, use {new}"


class DeprecatedAlias(argparse.Action):
    """``old`` stands for ``new``: same destination, same checks, one note on stderr when used."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new flag's default stays
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(deprecation_note(option_string, self.new), file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, *, dest: str | None = None,
                         **kwargs) -> argparse.Action:
    """Add ``old`` as a hidden alias of the flag ``new`` (``dest`` defaults to ``new``'s);
    ``kwargs`` (``choices``, ``type``) should match the new flag's."""
    dest = dest or new.lstrip("-").replace("-", "_")
    return parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, **kwargs)
