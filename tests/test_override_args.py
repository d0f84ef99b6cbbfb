"""key=value config overrides go anywhere on a tool's command line: megatron_vlm.cli's
OverridesParser takes them out before argparse, whose list options (--tasks, --tar) would
otherwise take them as values, and every tool that takes overrides parses with it."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from megatron_vlm.cli import OverridesParser, training_parser

REPO = Path(__file__).resolve().parents[1]


def tool(path: str):
    spec = importlib.util.spec_from_file_location(f"tool_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(*argv: str):
    return tool("tools/evaluate_vlm.py").build_parser().parse_intermixed_args(
        ["--checkpoint", "c", "--suite", "shapesworld", *argv])


def test_an_override_after_a_list_option_is_an_override_not_a_value():
    args = evaluate("--tasks", "shapesworld_vqa", "shapesworld_pope", "evaluation.data_root=d",
                    "--limit", "2", "train.params_dtype=bf16")
    assert args.tasks == ["shapesworld_vqa", "shapesworld_pope"] and args.limit == 2
    assert args.overrides == ["evaluation.data_root=d", "train.params_dtype=bf16"]


def test_only_a_word_whose_key_begins_with_a_config_key_is_taken():
    # A path holding '=' stays a value, and so does an option's single value; a mistyped leaf is
    # taken (the config check then names it with a suggestion).
    args = evaluate("--output", "name=x", "--tasks", "runs/a=b", "evaluation.data_rot=d")
    assert args.output == "name=x" and args.tasks == ["runs/a=b"]
    assert args.overrides == ["evaluation.data_rot=d"]


def test_overrides_keep_their_order_and_a_word_after_double_dash_stays_as_written():
    parser = training_parser("pretrain_vlm")
    args = parser.parse_intermixed_args(["train.lr=1", "c.yaml", "--recipe", "r", "train.lr=2"])
    assert (args.config, args.recipe, args.overrides) == ("c.yaml", "r", ["train.lr=1",
                                                                          "train.lr=2"])
    args = parser.parse_intermixed_args(["--recipe", "r", "seed=3", "--", "name=odd.yaml"])
    assert (args.config, args.overrides) == ("name=odd.yaml", ["seed=3"])


def test_precompute_tar_paths_end_at_an_override():
    args = tool("tools/precompute_image_embeddings.py").parse_args(
        ["--recipe", "tiny", "--tar", "a.tar", "b.tar", "model.encoder.weights_path=w",
         "--output", "o"])
    assert args.tar == ["a.tar", "b.tar"] and args.overrides == ["model.encoder.weights_path=w"]


def test_overrides_on_both_sides_of_an_option_without_intermixed_parsing():
    from megatron_vlm.check_parallel import parse_args

    args = parse_args(["train.lr=1", "--tp", "2", "seed=3"])
    assert args.tp == 2 and args.overrides == ["train.lr=1", "seed=3"]


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _config_arg_parser():
    from megatron_vlm.config import config_arg_parser

    return config_arg_parser("d")


TOOLS = {  # (how to get its parser, or its --help text)
    "evaluate_vlm": lambda _: tool("tools/evaluate_vlm.py").build_parser(),
    "precompute_image_embeddings":
        lambda _: tool("tools/precompute_image_embeddings.py").build_parser(),
    "pretrain_vlm, finetune_vlm": lambda _: training_parser("pretrain_vlm"),
    # describe, quickstart and bench/bench_eval.py are built on it too
    "config_arg_parser": lambda _: _config_arg_parser(),
    "convert_dclm_checkpoint":
        lambda capsys: _help(tool("tools/convert_dclm_checkpoint.py").parse_args, capsys),
    "check_parallel":
        lambda capsys: _help(importlib.import_module("megatron_vlm.check_parallel").parse_args,
                             capsys),
    "data.prepare":
        lambda capsys: _help(importlib.import_module("megatron_vlm.data.prepare").main, capsys),
}


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_that_takes_overrides_takes_them_anywhere_and_says_so(name, capsys):
    made = TOOLS[name](capsys)
    if isinstance(made, OverridesParser):
        made = made.format_help()
    assert "may go anywhere" in " ".join(made.split())
