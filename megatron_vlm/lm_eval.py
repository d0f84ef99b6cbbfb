"""lm-eval's own command line, with this project's checkpoints as ``--model megatron_vlm``.

    python -m megatron_vlm.lm_eval --model megatron_vlm \\
        --model_args checkpoint=runs/tiny/checkpoints,tokenizer=data/sw/tokenizer/tokenizer.json \\
        --tasks shapesworld --include_path data/sw/text/tasks --limit 50

    # the paper's text tasks, at TP=2 PP=2 and DP=2 (8 processes), from a local datasets cache:
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 torchrun --nproc_per_node 8 -m megatron_vlm.lm_eval \\
        --model megatron_vlm \\
        --model_args checkpoint=CKPT,tensor_parallel=2,pipeline_parallel=2,batch_size=16 \\
        --tasks arc_easy,hellaswag,piqa --num_fewshot 0 --output_path results/

Every argument is lm-eval 0.4.13's (``lm-eval run --help``); the model arguments are
``checkpoint`` (required), ``tokenizer`` (default: the checkpoint config's data.tokenizer),
``tensor_parallel``, ``pipeline_parallel``, ``batch_size``, ``max_length``, ``max_gen_toks``,
``device`` and ``eos_token`` (see :mod:`megatron_vlm.evaluation.lm_eval_adapter`). lm-eval's
``--batch_size`` and ``--device`` apply when given (a model argument wins over them); when they
are not, the model's defaults do (batch 8, the checkpoint config's ``parallel.device``), not
lm-eval's (1, cuda:0); lm-eval's summary line still prints its own batch size. Under torchrun
every process runs lm-eval on all requests and the data-parallel replicas share the scoring; the
results table (and ``--output_path``) come from global rank 0 only. For the named suites (the
paper's nine tasks, ShapesWorld) with the metric each is reported by, see
:mod:`megatron_vlm.evaluation.text_suites`.

A bad model argument or a missing checkpoint ends in one ``megatron_vlm.lm_eval: error: ...``
line and exit status 2.
"""

from __future__ import annotations

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import os
import sys
from typing import Optional, Sequence

from megatron_vlm.cli import run_main

PROG = "megatron_vlm.lm_eval"


def _results_on_global_rank0_only() -> None:
    """lm-eval returns (and so prints and saves) its results on every process whose LOCAL_RANK
    is 0, which on several nodes means one copy per node; keep only global rank 0's. The CLI
    looks ``simple_evaluate`` up in ``lm_eval.evaluator`` when it runs, so wrapping it there is
    enough."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    import lm_eval.evaluator as evaluator

    run = evaluator.simple_evaluate

    def quiet(*args, **kwargs):
        run(*args, **kwargs)
        return None

    evaluator.simple_evaluate = quiet


def _flag_given(argv: Sequence[str], long: str, short: Optional[str] = None) -> bool:
    """Whether ``argv`` sets lm-eval's flag ``long`` (``--flag V``, ``--flag=V``, an argparse
    abbreviation of it, or ``short``); a ``--config`` file may set anything."""
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name.startswith("--") and len(name) > 3 and (long.startswith(name)
                                                         or "--config".startswith(name)):
            return True
        if not token.startswith("--") and (token.startswith("-C")
                                           or (short is not None and token.startswith(short))):
            return True
    return False


def _model_args_values(argv: Sequence[str], key: str) -> list[str]:
    """The values of ``key=`` in ``--model_args`` (``k=v,k2=v2`` or ``k=v k2=v2``)."""
    values, inside = [], False
    for token in argv:
        if token.startswith("-"):
            inside = token in ("--model_args", "-a") or token.startswith("--model_args=")
            token = token.split("=", 1)[1] if token.startswith("--model_args=") else ""
        if inside:
            values += [item.split("=", 1)[1] for item in token.split(",")
                       if item.startswith(key + "=")]
    return values


def _check_checkpoint_exists(argv: Sequence[str]) -> None:
    """A missing checkpoint fails at once, not after lm-eval has indexed its tasks."""
    from megatron_vlm.evaluation.lm_eval_adapter import MODEL_NAME

    if MODEL_NAME not in argv and f"--model={MODEL_NAME}" not in argv:
        return
    for path in _model_args_values(argv, "checkpoint"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")


def main(argv: Optional[Sequence[str]] = None) -> int:
    configure_logging()
    # Importing the adapter registers the model (the CLI finds models of imported modules only).
    from lm_eval.__main__ import cli_evaluate

    from megatron_vlm.evaluation.lm_eval_adapter import ignore_lm_eval_args

    argv = list(sys.argv[1:] if argv is None else argv)
    _check_checkpoint_exists(argv)
    # lm-eval passes --batch_size 1 and --device cuda:0 when they are not given: this model's
    # own defaults (batch 8, the checkpoint's parallel.device) apply then.
    ignore_lm_eval_args([name for name, short in (("batch_size", "-b"), ("device", None))
                         if not _flag_given(argv, "--" + name, short)])
    _results_on_global_rank0_only()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    from megatron_vlm.runtime import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
