"""Lineage: every checkpoint records what made it (parent, stage, branch point, config and data
hashes, code version, token ledger) with its parents' records embedded; results.json records
the lineage of the checkpoint it scored; tools/lineage.py draws the tree of a directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from distributed import REPO
from test_loader import config, world  # noqa: F401  (world: a module fixture)

# Two steps of each stage on the loader's shards (text -> image-text from the text run's 50%
# checkpoint, step 1 -> fine-tuning), a checkpoint at the end of each and at the text run's
# middle.
SMALL = ["train.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=2",
         "schedule.warmup_iters=0"]
STAGES = {
    "text": ["data.ratios={text: 1.0}", "train.train_iters=2",
             "checkpoint.save_fractions=[0.5,1.0]"],
    "image": ["data.ratios={text: 0.5, captions: 0.5}", "train.train_iters=2",
              "schedule.mode=continue", "checkpoint.save_fractions=[1.0]"],
    "tuned": ["data.ratios={instructions: 1.0}", "train.train_iters=2",
              "schedule.mode=rewarmup", "checkpoint.load_optimizer=false",
              "checkpoint.save_fractions=[1.0]"],
}
PARENT = {"image": "text/checkpoints/step_0000001", "tuned": "image"}


@pytest.fixture(scope="module")
def chain(runtime, world, tmp_path_factory):  # noqa: F811
    """The three runs under one directory (about 20 s on 2 cores)."""
    from megatron_vlm.training.loop import train

    root = tmp_path_factory.mktemp("chain")
    for name, overrides in STAGES.items():
        load = [f"checkpoint.load={root / PARENT[name]}"] if name in PARENT else []
        train(config(world, *SMALL, *overrides, *load, f"output_dir={root / name}"))
    return root


def common(root, run, step):
    return json.loads((root / run / "checkpoints" / f"step_{step:07d}" / "common.json")
                      .read_text())


def sha256(path):
    from megatron_vlm.fsutil import sha256_file

    return sha256_file(path)


def test_each_checkpoint_records_its_lineage_and_its_parents(chain):
    from megatron_vlm.training.lineage import (chain_real_tokens, check_lineage, config_sha256,
                                               lineage_chain)

    saved = common(chain, "tuned", 2)
    tuned = check_lineage(saved["lineage"], "tuned")
    assert tuned["stage"] == "finetune" and tuned["checkpoint"] == {"step": 2, "fraction": 1.0}
    image_end = chain / "image" / "checkpoints" / "step_0000002"
    assert tuned["parent"]["path"] == str(image_end)
    assert tuned["parent"]["fingerprint"] == sha256(image_end / "common.json")
    assert tuned["branch_fraction"] == 1.0
    assert tuned["config_sha256"] == config_sha256(saved["config"])
    assert tuned["ledger"] == saved["ledger"] and list(tuned["ledger"]["sources"]) == [
        "instructions"]
    # The parents' records, as their own checkpoints saved them, embedded in the one file.
    image, text = tuned["parent_lineage"], tuned["parent_lineage"]["parent_lineage"]
    assert image == common(chain, "image", 2)["lineage"]
    assert text == common(chain, "text", 1)["lineage"]
    assert image["stage"] == "image_text" and image["branch_fraction"] == 0.5
    assert image["parent"]["fingerprint"] == sha256(
        chain / "text" / "checkpoints" / "step_0000001" / "common.json")
    assert text["stage"] == "text" and text["parent"] is None and text["parent_lineage"] is None
    assert [r["stage"] for r in lineage_chain(tuned)] == ["text", "image_text", "finetune"]
    # The data: each source's manifest hash and the blend index's key.
    data = image["data"]
    assert data["ratios"] == {"text": 0.5, "captions": 0.5}
    captions = data["files"]["captions"]
    assert captions["sha256"] == sha256(captions["path"])
    assert set(data["files"]) == {"tokenizer", "text", "captions"}
    assert data["blend_index"].startswith("blend-")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if (REPO / ".git").exists() and head:
        assert tuned["code"]["git_commit"] == head
    assert tuned["code"]["package_version"]
    # Real tokens along the chain: the text run up to its 50% checkpoint, then each run's own.
    per_run = [r["ledger"]["sources"] for r in lineage_chain(tuned)]
    assert chain_real_tokens(tuned) == {
        "text": per_run[0]["text"]["real_tokens"] + per_run[1]["text"]["real_tokens"],
        "captions": per_run[1]["captions"]["real_tokens"],
        "instructions": per_run[2]["instructions"]["real_tokens"]}
    assert per_run[0]["text"]["real_tokens"] == 4 * 64  # one step of 4 full windows


def test_results_json_records_the_lineage_of_the_checkpoint_it_scored(chain, world,  # noqa: F811
                                                                      tmp_path):
    from megatron_vlm.evaluation.runner import EvalRequest, evaluate

    raw = world[0] / "raw"
    evaluate(EvalRequest(checkpoint=str(chain / "tuned"), suite="shapesworld_vision",
                         tasks=["shapesworld_vqa"], limit=2, output_dir=str(tmp_path / "eval"),
                         progress=False, overrides=[f"evaluation.data_root={raw}",
                                                    "evaluation.max_new_tokens=4"]))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["lineage"] == common(chain, "tuned", 2)["lineage"]


def fake_evaluation(path, checkpoint, vision, text):
    """A results.json as the runner writes it, for the tree (scores are made up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "checkpoint": {"path": str(checkpoint), "step": 2,
                       "fingerprint": sha256(checkpoint / "common.json")[:16]},
        "tasks": {}, "stable_score": {"vision": {"score": vision}, "text": {"score": text}}}))


def lineage_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "lineage.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_tool_prints_the_tree_and_draws_it(chain, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import lineage as tool

    root = tmp_path / "sweep"
    shutil.copytree(chain, root)
    fake_evaluation(root / "tuned" / "eval" / "step_0000002" / "results.json",
                    root / "tuned" / "checkpoints" / "step_0000002", 0.4, 0.125)
    assert tool.main([str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{root}: 3 runs, 4 checkpoints, 1 evaluations"
    assert lines[1] == "text run text [tiny]: checkpoints at steps 1, 2; real tokens text 512; " \
                       "from scratch"
    assert lines[2].startswith("└─ step 1 (50%) -> image_text run image [tiny]: checkpoints at "
                               "steps 2; real tokens text 256, captions ")
    assert lines[3].startswith("   └─ step 2 (100%) -> finetune run tuned [tiny]")
    assert lines[4] == ("      └─ eval of step 2: vision 0.400, text 0.125 "
                        "(tuned/eval/step_0000002/results.json)")
    dot = (root / "lineage.dot").read_text()
    assert dot.count(" -> ") == 3 and '"step 1 (50%)"' in dot and "vision 0.400" in dot
    assert (root / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[-1].startswith(f"wrote {root / 'lineage.png'} (")
    # One run alone: its parent is outside the directory, named by the lineage.
    assert tool.main([str(root / "tuned"), "--output", str(tmp_path / "one.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    trained_in = chain / "image" / "checkpoints" / "step_0000002"  # the path at training time
    assert out[1].endswith(f"from {trained_in}, step 2 (100%) (not under {root / 'tuned'})")
    assert (tmp_path / "one.dot").is_file() and (tmp_path / "one.png").is_file()


def test_the_tool_says_in_one_line_what_is_wrong(chain, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = lineage_tool(empty)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"lineage: error: {empty}: no checkpoints")
    bad = tmp_path / "bad" / "checkpoints" / "step_0000002"
    shutil.copytree(chain / "text" / "checkpoints" / "step_0000002", bad)
    saved = json.loads((bad / "common.json").read_text())
    saved["lineage"]["stage"] = "pretraining"
    (bad / "common.json").write_text(json.dumps(saved))
    proc = lineage_tool(tmp_path / "bad")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (f"lineage: error: {bad / 'common.json'}: lineage.stage is "
                           "'pretraining', not one of text, image_text, finetune\n")
    (bad / "common.json").write_text("{not json")
    proc = lineage_tool(tmp_path / "bad")
    assert proc.returncode == 2 and f"{bad / 'common.json'}: not valid JSON" in proc.stderr
    assert "--output FILE" in lineage_tool("--help").stdout


def test_the_sweep_table_gains_the_real_tokens_per_source(chain, tmp_path):
    """results.csv's real_tokens.<source>: each source's real tokens along the evaluated
    checkpoint's chain, read from the lineage in its results.json."""
    from megatron_vlm.experiments.results_table import collect, write_tables
    from megatron_vlm.training.lineage import chain_real_tokens
    from test_sweep import build_plan, load_sweep, read_table, recipe_sweep, write_sweep

    plan = build_plan(load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [80], "finetune_epochs": [1, 2]}))))
    lineage = common(chain, "tuned", 2)["lineage"]
    evaluated = plan.run(plan.points[0].evaluation)
    evaluated.run_dir.mkdir(parents=True)
    (evaluated.run_dir / "results.json").write_text(json.dumps({
        "checkpoint": {"path": str(evaluated.final_checkpoint), "step": 2}, "tasks": {},
        "stable_score": {}, "lineage": lineage}))
    table = collect(plan)
    expected = chain_real_tokens(lineage)
    assert set(expected) == {"text", "captions", "instructions"}
    assert {s: table.rows[0][f"real_tokens.{s}"] for s in expected} == expected
    assert table.rows[1].get("real_tokens.text") is None  # not evaluated
    csv_path, _ = write_tables(table, tmp_path / "table")
    again = read_table(csv_path)
    assert int(again.rows[0]["real_tokens.captions"]) == expected["captions"]
