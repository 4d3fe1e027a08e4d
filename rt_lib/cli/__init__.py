"""The command line: ``python -m rt_lib <command>``, one function per command.

Every command's argument parsing lives here (``main`` dispatches on the first argument); the
library packages never parse a command line or import this package. May import every
package before it in ``rt_lib.LAYERS``.
"""
