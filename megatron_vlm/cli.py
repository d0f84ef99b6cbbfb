"""Shared behaviour of the entry points: bad input ends in one clear line, not a traceback."""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent
# Folders of the checkout whose files are the project's own code, beside the package.
_SCRIPT_DIRS = (_REPO / "tools", _REPO / "bench")
_RAISE = re.compile(r"^\s*(?:.*:\s*)?raise\b")
SHOW_TRACEBACK_ENV = "MEGATRON_VLM_TRACEBACK"
"""Set to 1 to see the traceback of every error, the one-line user errors included."""


def _is_project_file(filename: str) -> bool:
    path = Path(filename).resolve()
    return (path.is_relative_to(_PACKAGE) or any(path.is_relative_to(d) for d in _SCRIPT_DIRS)
            or path.parent == _REPO)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` describes the user's input and is shown as one line.

    A user error is a FileNotFoundError (it names the path), or a ValueError that the project
    raised itself: the innermost frame is the project's own code, at a ``raise`` statement,
    where the message names the file, record and field. A ValueError raised inside a library
    (numpy's broadcasting, ``json``, ``int()`` on a field the project did not check) is a bug
    of the project's, and keeps its traceback; so do the project's internal checks, which
    raise RuntimeError.
    """
    if isinstance(err, FileNotFoundError):
        return True
    if not isinstance(err, ValueError) or err.__traceback__ is None:
        return False
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return _is_project_file(frame.filename) and bool(_RAISE.match(frame.line or ""))


def run_main(main: Callable[[], int], prog: str) -> None:
    """Runs ``main`` and exits with its status; a user error (:func:`is_user_error`), or an
    output that cannot be written (:func:`megatron_vlm.fsutil.output_error_message`), prints
    ``prog: error: ...`` and exits with status 2 (after tearing down any process group so peers
    don't hang). ``MEGATRON_VLM_TRACEBACK=1`` shows their tracebacks too."""
    from megatron_vlm.lifecycle import tie_to_the_run

    tie_to_the_run()  # first: helpers (and torchrun's workers) die with the run
    try:
        status = main()
    except BaseException as err:  # megatron's failed checkpoint save is a BaseException
        # A user error, or an output the machine would not take (disk full, read-only, no
        # permission), is one line; anything else keeps its traceback.
        from megatron_vlm.fsutil import output_error_message

        line = str(err) if is_user_error(err) else output_error_message(err)
        if line is None or os.environ.get(SHOW_TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        _teardown_if_started()
        sys.exit(2)
    sys.exit(status)


def _teardown_if_started() -> None:
    """Destroys process groups a failed run had started, so peers don't wait on it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            from megatron_vlm.runtime import shutdown

            shutdown()
        except Exception:  # teardown after a failed start is best effort only
            pass


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


def run_training_entry(doc: str, prog: str, defaults=(), require_load: bool = False) -> None:
    """The whole of pretrain_vlm.py / finetune_vlm.py: config from a YAML file or recipe plus
    ``key=value`` overrides, then the training loop. ``defaults`` (key=value) adjust a
    ``--recipe`` only; a YAML file is used as written."""

    def main(argv=None) -> int:
        import argparse

        from megatron_vlm.config import format_help, load_config
        from megatron_vlm.logs import configure_logging

        configure_logging()
        parser = argparse.ArgumentParser(prog=prog, description=doc, epilog=format_help(),
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("config", nargs="?", default=None,
                            help="a YAML config file (or give --recipe)")
        parser.add_argument("--recipe", default=None, help="a recipe name instead of a file")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        args = parser.parse_intermixed_args(argv)
        source = args.config or args.recipe
        if args.config and "=" in args.config:  # only overrides were given
            args.overrides.insert(0, args.config)
            source = args.recipe
        if source is None:
            parser.error("give a config YAML file or --recipe NAME")
        # Stage defaults adjust a scale recipe (which describes pre-training); a YAML file given
        # by the user is taken as written, and key=value overrides win over both.
        stage_defaults = list(defaults) if source == args.recipe else []
        cfg = load_config(source, [*stage_defaults, *args.overrides])
        if require_load and not cfg.checkpoint.load:
            raise ValueError(f"{prog} needs checkpoint.load=PATH (the pre-trained checkpoint)")
        from megatron_vlm.runtime.distributed import peer_failures_in_one_line
        from megatron_vlm.training.loop import train

        with peer_failures_in_one_line(prog, cfg.output_dir) as on_step:
            train(cfg, on_step=on_step)
        from megatron_vlm.runtime import shutdown

        shutdown()
        return 0

    run_main(main, prog)
