"""How a recipe fails on bad input: one line saying what to do, exit status 2, never a traceback.

Each script raises :class:`UsageError` (a flag that cannot work, data it cannot have, a results
folder it must not overwrite) and ends with ``run_main(main)``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A bad flag or missing input; a ``ValueError``, so library callers can catch it as one."""


def run_main(main: Callable[[], Any]) -> None:
    """``main()``; a :class:`UsageError` becomes ``<script>: error: <message>`` on stderr (once,
    from the process of rank 0 under a distributed launch) and exit status 2."""
    try:
        main()
    except UsageError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            prog = Path(sys.argv[0]).name
            print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
