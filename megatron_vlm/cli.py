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


def add_tokenizer_args(parser) -> None:
    """``--tokenizer`` (required) and ``--eos-token``, as every tokenizing tool takes them."""
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a local Hugging Face tokenizers 'tokenizer.json' or a sentencepiece "
                             "'.model' file")
    parser.add_argument("--eos-token", default=None, metavar="TOKEN",
                        help="end-of-document token (default: <|endoftext|> or </s> for "
                             "tokenizer.json, the model's eos for sentencepiece)")


def add_progress_arg(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def log_summary(log, prog: str, summary) -> None:
    """The summary a tool prints at the end (``summary.lines()``), one log line each."""
    log.info("%s summary:", prog)
    for line in summary.lines():
        log.info("  %s", line)
