"""``python -m rt_lib <command>``: the kit's one launcher (``rt_lib.cli``)."""

import sys

from rt_lib.cli import main

sys.exit(main())
