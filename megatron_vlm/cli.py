"""Shared behaviour of the entry points: bad input ends in one clear line, not a traceback."""

from __future__ import annotations

import argparse
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
    don't hang); Ctrl-C prints ``prog: interrupted ...`` and exits with status 130.
    ``MEGATRON_VLM_TRACEBACK=1`` shows their tracebacks too."""
    from megatron_vlm.lifecycle import tie_to_the_run

    tie_to_the_run()  # first: helpers (and torchrun's workers) die with the run
    try:
        status = main()
    except KeyboardInterrupt as err:
        _interrupted(prog, err)
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


INTERRUPTED = 130  # 128 + SIGINT, the status a shell gives a process stopped by Ctrl-C


def _interrupted(prog: str, err: KeyboardInterrupt) -> None:
    """Ctrl-C (SIGINT): ``prog: interrupted`` and what ``err`` says (a training run: where it
    stopped and how to go on), one line, then exit status 130. Under torchrun every rank got
    the signal and rank 0 alone says so. ``MEGATRON_VLM_TRACEBACK=1`` shows where it was."""
    if os.environ.get(SHOW_TRACEBACK_ENV, "") not in ("", "0"):
        raise err
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{prog}: interrupted{f' {err}' if str(err) else ''}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        # The peers stop at the same moment, and torch's destructors block on a stopped peer's
        # connection: exit now (helpers die with this process, megatron_vlm.lifecycle).
        import logging

        logging.shutdown()
        sys.stdout.flush()
        os._exit(INTERRUPTED)
    _teardown_if_started()
    sys.exit(INTERRUPTED)


def _teardown_if_started() -> None:
    """Destroys process groups a failed run had started, so peers don't wait on it."""
    # A tool that failed before importing torch has no group to tear down: importing torch
    # here would only add seconds to its error.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            from megatron_vlm.runtime import shutdown

            shutdown()
        except Exception:  # teardown after a failed start is best effort only
            pass


OVERRIDES_ANYWHERE = ("they may go anywhere, also right after a list option's values (--tasks a b "
                      "key=value): a word whose key begins with a config section or field is an "
                      "override; after -- every word stays as written")
_KEY = re.compile(r"^([A-Za-z_]\w*)(?:\.\w+)*=")


class OverridesParser(argparse.ArgumentParser):
    """The argument parser of a tool that takes ``key=value`` config overrides.

    Argparse gives an option with a list of values (``nargs="+"``, e.g. ``--tasks``) every word
    up to the next option, so ``--tasks vqav2 pope evaluation.batch_size=8`` would make the
    override a task. Here every override is taken out before parsing and put in ``overrides``
    (ahead of the positional ones), so overrides may go anywhere. A word is an override when
    its key (before ``=``) begins with a top-level config section or field (``evaluation.``,
    ``train.``, ``name``): a path that holds ``=`` is not one, and a mistyped leaf
    (``evaluation.data_rot=x``) still reaches the config's check with its suggestion. Not taken
    are the values of an option that takes a fixed number of them (``--output name=x`` names a
    directory) and every word after ``--``.
    """

    def add_overrides(self, help: str) -> None:
        """The positional ``overrides`` (``key=value ...``); ``--help`` says they go anywhere."""
        self.add_argument("overrides", nargs="*", metavar="key=value",
                          help=f"{help}; {OVERRIDES_ANYWHERE}")

    def parse_args(self, args=None, namespace=None):
        words, taken = self._take_overrides(args)
        return _put_overrides(super().parse_args(words, namespace), taken)

    def parse_intermixed_args(self, args=None, namespace=None):
        words, taken = self._take_overrides(args)
        return _put_overrides(super().parse_intermixed_args(words, namespace), taken)

    def _take_overrides(self, args) -> tuple[list[str], list[str]]:
        """(the words left to parse, the overrides taken out), in command-line order."""
        from megatron_vlm.config import config_keys

        top = {key for key in config_keys() if "." not in key}
        words = list(sys.argv[1:] if args is None else args)
        keep: list[str] = []
        taken: list[str] = []
        values_left = 0
        for i, word in enumerate(words):
            if word == "--":
                return keep + words[i:], taken
            if values_left:
                values_left -= 1
                keep.append(word)
            elif word in self._option_string_actions:
                nargs = self._option_string_actions[word].nargs
                nargs = 1 if nargs is None else nargs
                values_left = nargs if isinstance(nargs, int) else 0
                keep.append(word)
            elif (match := _KEY.match(word)) and match.group(1) in top:
                taken.append(word)
            else:
                keep.append(word)
        return keep, taken


def _put_overrides(args: argparse.Namespace, taken: list[str]) -> argparse.Namespace:
    args.overrides = [*taken, *(getattr(args, "overrides", None) or [])]
    return args


def add_tokenizer_args(parser) -> None:
    """``--tokenizer`` (required) and ``--eos-token``, as every tokenizing tool takes them."""
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="a local Hugging Face tokenizers 'tokenizer.json' or a sentencepiece "
                             "'.model' file")
    parser.add_argument("--eos-token", default=None, metavar="TOKEN",
                        help="end-of-document token (default: <|endoftext|> or </s> for "
                             "tokenizer.json, the model's eos for sentencepiece)")


def add_corpus_args(parser) -> None:
    """How a text corpus is read (tools/preprocess_text.py and tools/train_tokenizer.py read it
    the same way): ``--input``, ``--field``, ``--txt-document`` and ``--max-skips``."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="JSONL files (.jsonl/.json, optionally .gz or .zst) with one JSON "
                             "object per line, parquet files, or plain-text files (.txt, "
                             "optionally .gz or .zst; see --txt-document); a directory stands "
                             "for all such files under it (sorted). Documents are numbered in "
                             "this order.")
    parser.add_argument("--field", default="text",
                        help="the JSON field / parquet column holding the document text "
                             "(default: %(default)s)")
    parser.add_argument("--txt-document", choices=("block", "file"), default="block",
                        help="what one document of a .txt input is: 'block', each run of lines "
                             "between blank (whitespace-only) lines; 'file', the whole file. "
                             "Either way without the line break after its last line (default: "
                             "%(default)s)")
    parser.add_argument("--max-skips", type=int, default=0, metavar="N",
                        help="malformed records (invalid JSON or UTF-8, missing or non-string "
                             "field) to skip and list before stopping with an error naming the "
                             "file and line (default: %(default)s)")


def add_progress_arg(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def log_summary(log, prog: str, summary) -> None:
    """The summary a tool prints at the end (``summary.lines()``), one log line each."""
    log.info("%s summary:", prog)
    for line in summary.lines():
        log.info("  %s", line)


def training_parser(prog: str, doc: str = "") -> OverridesParser:
    """The command line of pretrain_vlm.py and finetune_vlm.py (what the sweep checks its
    planned commands with)."""
    from megatron_vlm.config import format_help

    parser = OverridesParser(prog=prog, description=doc, epilog=format_help(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="a YAML config file (or give --recipe)")
    parser.add_argument("--recipe", default=None, help="a recipe name instead of a file")
    parser.add_overrides("config overrides")
    return parser


def run_training_entry(doc: str, prog: str, defaults=(), require_load: bool = False) -> None:
    """The whole of pretrain_vlm.py / finetune_vlm.py: config from a YAML file or recipe plus
    ``key=value`` overrides, then the training loop. ``defaults`` (key=value) adjust a
    ``--recipe`` only; a YAML file is used as written."""

    def main(argv=None) -> int:
        from megatron_vlm.config import load_config
        from megatron_vlm.logs import configure_logging

        configure_logging()
        parser = training_parser(prog, doc)
        args = parser.parse_intermixed_args(argv)
        source = args.config or args.recipe
        # A mistyped key (not taken as an override) lands here: the config check names it.
        if args.config and "=" in args.config:
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
        from megatron_vlm.lifecycle import launch_command
        from megatron_vlm.runtime.distributed import peer_failures_in_one_line
        from megatron_vlm.training.loop import train, where_it_stopped

        progress = None
        try:
            with peer_failures_in_one_line(prog, cfg.output_dir) as progress:
                train(cfg, on_step=progress)
        except KeyboardInterrupt as err:  # run_main's one line says where the run stopped
            raise KeyboardInterrupt(where_it_stopped(
                cfg, progress.step if progress else None, launch_command())) from err
        from megatron_vlm.runtime import shutdown

        shutdown()
        return 0

    run_main(main, prog)
