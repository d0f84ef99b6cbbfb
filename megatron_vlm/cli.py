"""Shared behaviour of the entry points: bad input ends in one clear line, not a traceback."""

from __future__ import annotations

import sys
from typing import Callable

# Errors that describe the user's input (a config key, a path, a shape); anything else is a
# bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def run_main(main: Callable[[], int], prog: str) -> None:
    """Runs ``main`` and exits with its status; a user error prints ``prog: error: ...`` and
    exits with status 2 (after tearing down any process group so peers don't hang)."""
    try:
        status = main()
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        try:
            from megatron_vlm.runtime import shutdown

            shutdown()
        except Exception:  # teardown after a failed start is best effort only
            pass
        sys.exit(2)
    sys.exit(status)
