"""tools/sweep.py and megatron_vlm.experiments: the sweep file's checks, the grid expanded into
shared stage runs in dependency order, dry runs of every example sweep, the SLURM writer, and a
real tiny_cpu sweep on ShapesWorld that is killed midway, resumed, collected and rerun."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from megatron_vlm.experiments.execute import entry_parser, stage_done, write_slurm
from megatron_vlm.experiments.plan import build_plan, parse_only
from megatron_vlm.experiments.results_table import read_table
from megatron_vlm.experiments.sweep_spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "examples" / "sweeps").glob("*.yaml"))
TINY = REPO / "examples" / "tiny_cpu"
ONE_B = REPO / "examples" / "1b"


def write_sweep(tmp_path: Path, body: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def recipe_sweep(tmp_path: Path, grid: dict, scale_dir: Path = TINY, **extra) -> dict:
    """A sweep over the example configs of one scale, output under tmp_path."""
    body = {"name": "t", "output_root": str(tmp_path / "out"),
            "stages": {"text": {"config": str(scale_dir / "text.yaml")},
                       "image_text": {
                           "config": str(scale_dir / "image_text.yaml"),
                           "rewarmup_config": str(scale_dir / "image_text_rewarmup.yaml")},
                       "finetune": {"config": str(scale_dir / "finetune.yaml"),
                                    "steps_per_epoch": 10},
                       "evaluate": {"suite": "shapesworld"}},
            "grid": grid}
    body.update(extra)
    return body


def option(run, key: str) -> str:
    """The value of the last key=value override of ``key`` in a run's arguments."""
    values = [a.partition("=")[2] for a in run.args if a.startswith(key + "=")]
    assert values, f"{run.id} has no {key}= override: {run.args}"
    return values[-1]


def sweep_tool():
    spec = importlib.util.spec_from_file_location("sweep_tool", REPO / "tools" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Plans


def test_five_checkpoint_percents_share_one_text_run(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [20, 40, 60, 80, 100]})))
    plan = build_plan(spec)
    texts, images = plan.by_stage("text"), plan.by_stage("image_text")
    assert len(texts) == 1 and len(images) == 5 and len(plan.by_stage("evaluate")) == 5
    text = texts[0]
    assert sorted(text.points) == sorted(p.name for p in plan.points)
    # the text run saves every checkpoint the image-text runs start from (40 steps: 8..40)
    assert yaml.safe_load(option(text, "checkpoint.save_fractions")) == [0.2, 0.4, 0.6, 0.8, 1.0]
    loads = {run.values["text_checkpoint"]: option(run, "checkpoint.load") for run in images}
    assert loads == {p: str(text.run_dir / "checkpoints" / f"step_{p * 40 // 100:07d}")
                     for p in (20, 40, 60, 80, 100)}
    # 100% re-warms the LR (its own config), the others continue the text run's schedule
    configs = {run.values["text_checkpoint"]: Path(run.args[0]).name for run in images}
    assert configs == {20: "image_text.yaml", 40: "image_text.yaml", 60: "image_text.yaml",
                       80: "image_text.yaml", 100: "image_text_rewarmup.yaml"}
    assert all(run.needs == [text.id] for run in images)


def test_fine_tuning_epochs_share_one_image_text_run(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [80], "finetune_epochs": [0, 1, 3]})))
    plan = build_plan(spec)
    (image,) = plan.by_stage("image_text")
    finetunes = plan.by_stage("finetune")
    assert len(plan.by_stage("text")) == 1 and len(finetunes) == 2
    assert {r.values["finetune_epochs"]: r.train_iters for r in finetunes} == {1: 10, 3: 30}
    assert all(option(r, "checkpoint.load") == str(image.run_dir / "checkpoints")
               for r in finetunes)
    assert len(image.points) == 3
    # 0 epochs evaluates the image-text run itself
    targets = {p.values["finetune_epochs"]: plan.run(p.evaluation).target for p in plan.points}
    assert targets[0] == image.id and targets[1] != targets[3]
    assert plan.run(plan.points[0].evaluation).run_dir == image.run_dir / "eval"


def test_runs_come_in_dependency_order(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [0, 40, 100], "projector": ["mlp2", "linear"],
                   "finetune_epochs": [1, 2]},
        data={"command": "python -c pass", "creates": str(tmp_path / "data")})))
    plan = build_plan(spec)
    seen = set()
    for run in plan.runs:
        assert set(run.needs) <= seen, f"{run.id} runs before {set(run.needs) - seen}"
        seen.add(run.id)
    assert plan.runs[0].id == "data"
    assert len(seen) == len(plan.runs), "a stage run appears twice"
    # the 0% point starts from scratch: it needs the data, not the text run
    scratch = [r for r in plan.by_stage("image_text") if r.values["text_checkpoint"] == 0]
    assert scratch and all(r.needs == ["data"] and option(r, "checkpoint.load") == "null"
                           for r in scratch)
    for point in plan.points:
        chain = [plan.run(i) for i in point.chain]
        assert [r.stage for r in chain][-1] == "evaluate"
        for before, after in zip(chain, chain[1:]):
            assert before.id in after.needs, f"{after.id} does not wait for {before.id}"


def test_run_names_follow_the_grid_values_not_the_file_order(tmp_path):
    a = recipe_sweep(tmp_path, {"text_checkpoint": [80, 20], "image_ratio": [0.1, 0.3]})
    b = recipe_sweep(tmp_path, {"image_ratio": [0.3, 0.1], "text_checkpoint": [20, 80]})
    plan_a = build_plan(load_sweep(write_sweep(tmp_path, a, "a.yaml")))
    plan_b = build_plan(load_sweep(write_sweep(tmp_path, b, "b.yaml")))
    assert {r.id for r in plan_a.runs} == {r.id for r in plan_b.runs}
    assert "image_text/ckpt20_img0.3" in {r.id for r in plan_a.runs}
    by_name = {p.name: p.values for p in plan_a.points}
    assert by_name["ckpt80_img0.1"] == {"text_checkpoint": 80, "image_ratio": 0.1}
    run = plan_a.run("image_text/ckpt20_img0.3")
    assert run.run_dir == tmp_path / "out" / "image_text" / "ckpt20_img0.3"
    assert option(run, "data.ratios") == "{text: 0.7, captions: 0.3}"


def test_axes_set_the_stage_configs(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [80], "image_ratio": [0.2],
                   "instruction_fraction": [0.25], "projector": ["linear"]},
        overrides=[f"data.instructions={tmp_path}/i", f"data.instruction_images={tmp_path}/ii"])))
    plan = build_plan(spec)
    (image,) = plan.by_stage("image_text")
    assert yaml.safe_load(option(image, "data.ratios")) == {"text": 0.8, "captions": 0.15,
                                                             "instructions": 0.05}
    assert option(image, "model.projector.type") == "linear"
    assert option(image, "checkpoint.load_parts") == "decoder"
    assert option(image, "checkpoint.load_optimizer") == "false"
    (finetune,) = plan.by_stage("finetune")
    assert option(finetune, "model.projector.type") == "linear"


def test_gpu_hours_are_tokens_over_throughput_with_shared_runs_counted_once(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [40, 80]}, throughput=1000)))
    plan = build_plan(spec)
    estimate = plan.gpu_hours()
    text_tokens = 40 * 8 * 256
    assert estimate["stages"]["text"] == {"runs": 1, "tokens": text_tokens,
                                          "gpu_hours": pytest.approx(text_tokens / 1000 / 3600)}
    tokens = sum(r.tokens for r in plan.runs if r.tokens)
    assert estimate["total"] == pytest.approx(tokens / 1000 / 3600)
    assert estimate["without_sharing"] == pytest.approx((tokens + text_tokens) / 1000 / 3600)


def test_the_text_run_saves_every_checkpoint_the_grid_needs(tmp_path):
    body = recipe_sweep(tmp_path, {"text_checkpoint": [50, 75]})
    body["stages"]["text"]["overrides"] = ["checkpoint.save_fractions=[0.2]"]
    plan = build_plan(load_sweep(write_sweep(tmp_path, body)))
    (text,) = plan.by_stage("text")
    assert yaml.safe_load(option(text, "checkpoint.save_fractions")) == [0.2, 0.5, 0.75, 1.0]
    assert sorted(option(r, "checkpoint.load")[-7:] for r in plan.by_stage("image_text")) == \
        ["0000020", "0000030"]


def test_only_selects_grid_points(tmp_path):
    body = recipe_sweep(tmp_path, {"text_checkpoint": [40, 80], "projector": ["mlp2", "linear"]})
    body["stages"]["text"]["overrides"] = ["checkpoint.save_fractions=[1.0]"]
    spec = load_sweep(write_sweep(tmp_path, body))
    plan = build_plan(spec, parse_only(["projector=linear", "text_checkpoint=ckpt80"], spec))
    assert [p.name for p in plan.points] == ["ckpt80_projlinear"]
    # the shared text run still saves every checkpoint of the whole grid
    assert yaml.safe_load(option(plan.by_stage("text")[0], "checkpoint.save_fractions")) == \
        [0.4, 0.8, 1.0]
    with pytest.raises(ValueError, match="not a value of grid.projector"):
        parse_only(["projector=mlp3"], spec)


@pytest.mark.parametrize("change, field, message", [
    ({"grid": {"checkpoint_pct": [20]}}, "grid.checkpoint_pct", "unknown axis"),
    ({"grid": {}}, "grid", "empty"),
    ({"grid": {"text_checkpoint": []}}, "grid.text_checkpoint", "empty list"),
    ({"grid": {"text_checkpoint": [120]}}, "grid.text_checkpoint[0]", "outside"),
    ({"stages": {"image_text": {"config": "no/such.yaml"}}}, "stages.image_text.config",
     "no such config file"),
    ({"stages": {"image_text": {"config": str(TINY / "image_text.yaml"), "confg": 1}}},
     "stages.image_text.confg", "unknown field"),
    ({"grid": {"finetune_epochs": [2]}}, "stages.finetune", "missing"),
    ({"grid": {"text_checkpoint": [0]}}, "stages.image_text.rewarmup_config", "missing"),
    ({"grid": {"text_checkpoint": [40]}}, "stages.text", "missing"),
    ({"outptu_root": "x"}, "outptu_root", "unknown field"),
    ({"stages": {"image_text": {"config": str(TINY / "image_text.yaml"),
                                "overrides": ["train.lr"]}}},
     "stages.image_text.overrides[0]", "dotted.key=value"),
])
def test_a_bad_sweep_file_is_one_error_naming_file_and_field(tmp_path, change, field, message):
    body = {"name": "bad", "stages": {"image_text": {"config": str(TINY / "image_text.yaml")}},
            "grid": {"projector": ["mlp2"]}}
    for key, value in change.items():
        body[key] = {**body[key], **value} if key == "stages" else value
    path = write_sweep(tmp_path, body)
    with pytest.raises(ValueError) as err:
        load_sweep(path)
    text = str(err.value)
    assert text.startswith(f"{path}: {field}: ") and message in text, text
    assert "\n" not in text


def test_a_bad_override_stops_the_plan_naming_the_run(tmp_path):
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]})
    body["stages"]["image_text"]["overrides"] = ["train.lrr=1"]
    spec = load_sweep(write_sweep(tmp_path, body))
    with pytest.raises(ValueError, match=r"run image_text/ckpt80: config .*train\.lrr"):
        build_plan(spec)


def test_a_continuing_stage_config_gets_its_checkpoint_from_the_sweep(tmp_path):
    # Neither config names a checkpoint: the sweep wires in the parent run's before the config
    # is validated, so schedule.mode=continue is not refused for want of checkpoint.load.
    image_text, finetune = tmp_path / "image_text.yaml", tmp_path / "finetune.yaml"
    image_text.write_text(f"base: {TINY / 'image_text.yaml'}\ncheckpoint: {{load: null}}\n")
    finetune.write_text(f"base: {TINY / 'finetune.yaml'}\nschedule: {{mode: continue}}\n"
                        "checkpoint: {load: null}\n")
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]})
    body["stages"]["image_text"]["config"] = str(image_text)
    body["stages"]["finetune"]["config"] = str(finetune)
    plan = build_plan(load_sweep(write_sweep(tmp_path, body)))
    text, image = plan.run("text"), plan.run("image_text/ckpt80")
    assert image.resolved["schedule"]["mode"] == "continue"
    assert image.resolved["checkpoint"]["load"] == str(
        text.run_dir / "checkpoints" / "step_0000032")
    assert plan.run("finetune/ckpt80").resolved["checkpoint"]["load"] == str(
        image.run_dir / "checkpoints")


def evaluate_sweep(tmp_path: Path, **evaluate) -> Path:
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]})
    body["stages"]["evaluate"].update(evaluate)
    return write_sweep(tmp_path, body)


def test_an_evaluation_with_tasks_and_overrides_gets_a_command_that_parses(tmp_path,
                                                                          monkeypatch):
    tasks, overrides = ["shapesworld_vqa", "shapesworld_pope"], ["evaluation.data_root=d",
                                                                  "evaluation.batch_size=4"]
    path = evaluate_sweep(tmp_path, tasks=tasks, overrides=overrides)
    monkeypatch.chdir(REPO)
    assert sweep_tool().main([str(path), "--dry-run"]) == 0  # it parses every command
    (run,) = build_plan(load_sweep(path)).by_stage("evaluate")
    args = entry_parser(run.entry).parse_intermixed_args(run.args)
    assert (args.tasks, args.overrides) == (tasks, overrides)


def test_a_bad_evaluation_override_stops_the_plan_naming_the_run(tmp_path):
    path = evaluate_sweep(tmp_path, overrides=["evaluation.batch_sise=4"])
    with pytest.raises(ValueError, match=r"run evaluate/finetune/ckpt80: stages\.evaluate\."
                                         r"overrides: .*batch_sise.*did you mean"):
        build_plan(load_sweep(path))


@pytest.mark.parametrize("args, problem", [
    (["--tensor-parallel"], "its command does not parse (tools/evaluate_vlm.py: argument "
                            "--tensor-parallel: expected one argument): tools/evaluate_vlm.py"),
    (["--tasks", "shapesworld_vqa"], "its command gives tasks ['shapesworld_vqa'] where the "
                                     "sweep means None: "),
], ids=["a missing value", "tasks outside stages.evaluate.tasks"])
def test_a_dry_run_refuses_a_command_its_tool_would_refuse_naming_the_run(tmp_path, monkeypatch,
                                                                         args, problem):
    path = evaluate_sweep(tmp_path, args=args)
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError) as err:
        sweep_tool().main([str(path), "--dry-run"])
    text = str(err.value)
    assert text.startswith(f"{path}: run evaluate/finetune/ckpt80: {problem}"), text
    assert "\n" not in text


def test_the_cli_reports_a_bad_file_in_one_line(tmp_path):
    path = write_sweep(tmp_path, {"stages": {"image_text": {"config": "x.yaml"}},
                                  "grid": {"projector": ["mlp2"]}})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "sweep.py"), str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"sweep: error: {path}: stages.image_text.config: no such config file 'x.yaml' "
        f"(looked for {tmp_path / 'x.yaml'})"]


def test_help_describes_the_tool(capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep_tool().main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dry-run", "--slurm", "--collect", "--nproc", "--only", "--grace"):
        assert flag in out
    assert "docs/experiments.md" in out


# ---------------------------------------------------------------------------------------------
# Dry runs and SLURM


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_dry_run_of_every_example_sweep_prints_the_plan_and_gpu_hours(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert sweep_tool().main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    spec = load_sweep(path)
    plan = build_plan(spec)
    assert f"sweep {spec.name}" in out and f"grid ({len(plan.points)} points)" in out
    for run in plan.runs:
        assert run.id in out and run.command_text() in out
    assert "GPU-hours, an ESTIMATE" in out
    total = plan.gpu_hours()["total"]
    assert total is not None and total > 0
    assert re.search(r"total\s+[\d,.]+(e[-+]\d+)? GPU-h", out), out[-600:]
    scale = spec.scale
    assert f"throughput for scale {scale}:" in out
    if path.name.endswith("_tiny_cpu.yaml"):
        assert plan.runs[0].id == "data"
    else:
        assert path.with_name(path.name.replace("_1b.yaml", "_tiny_cpu.yaml")).is_file()


def test_example_sweeps_cover_the_papers_experiments():
    grids = {p.name: load_sweep(p).grid for p in SWEEPS}
    assert len(grids["fig4_checkpoint_pct_1b.yaml"]["text_checkpoint"]) == 5
    assert grids["fig5_image_ratio_1b.yaml"]["text_checkpoint"] == (80,)
    assert grids["fig6_image_ratio_scratch_1b.yaml"]["text_checkpoint"] == (0,)
    assert "instruction_fraction" in grids["fig7_instruction_data_1b.yaml"]
    assert len(grids["fig8_finetune_epochs_1b.yaml"]["finetune_epochs"]) > 1
    ablation = grids["seed_ablations_1b.yaml"]
    assert ablation["encoder"] == ("frozen", "unfrozen") and ablation["projector"] == (
        "mlp2", "linear")


def _submissions(submit: Path) -> list[tuple[str, list[str], str]]:
    """(variable, dependency variables, script) of each sbatch line, in order."""
    out = []
    for line in submit.read_text().splitlines():
        m = re.fullmatch(r"(job_\d+)=\$\(sbatch --parsable(?: --kill-on-invalid-dep=yes "
                         r"--dependency=afterok:(\S+))? (\S+)\)", line)
        if m:
            deps = re.findall(r"\$\{(job_\d+)\}", m.group(2) or "")
            out.append((m.group(1), deps, m.group(3)))
    return out


def test_slurm_scripts_chain_jobs_with_afterok_in_dependency_order(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_sweep(REPO / "examples" / "sweeps" / "fig8_finetune_epochs_1b.yaml")
    plan = build_plan(spec)
    files = write_slurm(plan, tmp_path / "slurm")
    submit = tmp_path / "slurm" / "submit.sh"
    assert files[-1] == submit and os.access(submit, os.X_OK)
    subs = _submissions(submit)
    assert len(subs) == len(plan.runs)
    var_of = {}
    for (var, deps, script), run in zip(subs, plan.runs):
        assert all(d in var_of.values() for d in deps), f"{script} depends on a later job"
        assert sorted(deps) == sorted(var_of[n] for n in run.needs)
        var_of[run.id] = var
        body = (tmp_path / "slurm" / script).read_text()
        assert "srun --kill-on-bad-exit=1" in body and "torchrun --nnodes" in body
        assert run.command_text() in body and f"--nodes={spec.slurm.nodes_for(run.stage)}" in body
        assert f"cd {REPO}" in body
    image = plan.by_stage("image_text")[0]
    text_var = var_of["text"]
    assert [d for v, d, _ in subs if v == var_of[image.id]] == [[text_var]]
    ran = subprocess.run(["bash", "-n", str(submit)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr


def test_slurm_leaves_out_runs_that_are_done(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(tmp_path, {"text_checkpoint": [40, 80]})))
    plan = build_plan(spec)
    text = plan.by_stage("text")[0]
    text.final_checkpoint.mkdir(parents=True)
    (text.final_checkpoint / "common.json").write_text("{}")
    assert stage_done(text)
    write_slurm(plan, tmp_path / "slurm")
    subs = _submissions(tmp_path / "slurm" / "submit.sh")
    assert len(subs) == len(plan.runs) - 1
    assert not any("_text.sbatch" in s and "image" not in s for _, _, s in subs)
    first_images = [deps for _, deps, s in subs if "image_text" in s]
    assert first_images and all(deps == [] for deps in first_images)


def test_a_training_run_is_done_only_with_its_final_checkpoint(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(tmp_path, {"text_checkpoint": [80]})))
    text = build_plan(spec).by_stage("text")[0]
    checkpoints = text.run_dir / "checkpoints"
    (checkpoints / "step_0000032").mkdir(parents=True)
    (checkpoints / "step_0000032" / "common.json").write_text("{}")
    (checkpoints / "latest").write_text("step_0000032")
    assert not stage_done(text), "an interrupted run (80% saved) is not done"
    (checkpoints / "step_0000040.tmp").mkdir()
    assert not stage_done(text), "a checkpoint still being written is not done"
    (checkpoints / "step_0000040").mkdir()
    assert not stage_done(text), "a checkpoint without its common.json is incomplete"
    (checkpoints / "step_0000040" / "common.json").write_text("{}")
    assert stage_done(text) == "final checkpoint step_0000040 exists"


def test_an_evaluation_is_done_only_when_every_task_is_scored(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(tmp_path, {"text_checkpoint": [80]})))
    plan = build_plan(spec)
    (ev,) = plan.by_stage("evaluate")
    ev.run_dir.mkdir(parents=True)
    tasks = {t: {"kind": "vision", "settings": {"limit": None}, "metrics": {"accuracy": 0.5}}
             for t in ev.tasks}
    results = {"checkpoint": {"path": str(ev.final_checkpoint)}, "tasks": tasks,
               "stable_score": {"vision": {"score": 0.1}}}
    path = ev.run_dir / "results.json"
    path.write_text(json.dumps(results))
    assert stage_done(ev)
    path.write_text(json.dumps({**results, "tasks": dict(list(tasks.items())[:-1])}))
    assert not stage_done(ev)
    other = {t: {**e, "settings": {"limit": 4}} for t, e in tasks.items()}
    path.write_text(json.dumps({**results, "tasks": other}))
    assert not stage_done(ev)
    path.write_text(json.dumps({**results, "checkpoint": {"path": "x/step_0000001"}}))
    assert not stage_done(ev)


def test_the_table_has_one_row_per_grid_point_keyed_by_its_values(tmp_path):
    from megatron_vlm.experiments.results_table import collect, markdown, write_tables

    spec = load_sweep(write_sweep(tmp_path, recipe_sweep(
        tmp_path, {"text_checkpoint": [40, 80], "projector": ["mlp2", "linear"],
                   "finetune_epochs": [0, 2]})))
    plan = build_plan(spec)
    # each evaluation's accuracies encode its own grid point
    for point in plan.points:
        if point.values == {"text_checkpoint": 40, "projector": "linear", "finetune_epochs": 2}:
            continue  # never evaluated
        v = point.values
        code = v["text_checkpoint"] / 100 + (0.01 if v["projector"] == "linear" else 0) \
            + v["finetune_epochs"] / 1000
        ev = plan.run(point.evaluation)
        tasks = {"shapesworld_vqa": {"kind": "vision", "metrics": {"accuracy": code}},
                 "shapesworld_arith": {"kind": "text", "metrics": {"acc": code / 2}}}
        if point.values["finetune_epochs"] == 0 and point.values["projector"] == "mlp2":
            tasks = {**tasks, **{t: {"kind": "text", "metrics": {"accuracy": 0.5}}
                                 for t in ("shapesworld_count", "shapesworld_order")},
                     **{t: {"kind": "vision", "metrics": {"accuracy": 0.5}}
                        for t in ("shapesworld_pope", "shapesworld_ref")}}
        ev.run_dir.mkdir(parents=True)
        (ev.run_dir / "results.json").write_text(json.dumps({
            "checkpoint": {"path": str(ev.final_checkpoint), "step": 7}, "tasks": tasks,
            "stable_score": {"vision": {"score": code}, "text": {"score": -code}}}))
    table = collect(plan)
    assert [row["run"] for row in table.rows] == [p.name for p in plan.points]
    assert table.metrics[:4] == ["stable_score.vision", "stable_score.text",
                                 "vision.shapesworld_vqa", "vision.shapesworld_pope"]
    for row in table.rows:
        values = {a: row[a] for a in spec.grid}
        if values == {"text_checkpoint": 40, "projector": "linear", "finetune_epochs": 2}:
            assert row["status"] == "missing" and row["stable_score.vision"] is None
            continue
        code = values["text_checkpoint"] / 100 + (0.01 if values["projector"] == "linear" else 0) \
            + values["finetune_epochs"] / 1000
        assert row["vision.shapesworld_vqa"] == pytest.approx(code)
        assert row["text.shapesworld_arith"] == pytest.approx(code / 2)
        assert row["stable_score.text"] == pytest.approx(-code) and row["step"] == 7
        full = values["finetune_epochs"] == 0 and values["projector"] == "mlp2"
        assert row["status"] == ("ok" if full else "partial")
    csv_path, md_path = write_tables(table, tmp_path / "out")
    again = read_table(csv_path)
    assert again.rows[1]["vision.shapesworld_vqa"] == table.rows[1]["vision.shapesworld_vqa"]
    assert [r["text_checkpoint"] for r in again.rows] == [40] * 4 + [80] * 4
    assert "| ckpt80_projlinear_ft2 | 80 | linear | 2 | partial | 0.8120 | -0.8120 |" in \
        md_path.read_text() == markdown(table)


def test_the_table_shows_intervals_and_compare_tests_every_arm_against_a_baseline(tmp_path,
                                                                                  capsys):
    """results.csv gets <metric>_lo/_hi columns (read back as intervals, not metrics) and
    results.md value [lo, hi]; --compare pairs every evaluated grid point with the baseline."""
    from evaluation_helpers import results_with_items

    from megatron_vlm.experiments.results_table import collect, markdown, write_tables
    from megatron_vlm.evaluation.uncertainty import add_intervals

    body = recipe_sweep(tmp_path, {"text_checkpoint": [40, 60, 80]})
    spec = load_sweep(write_sweep(tmp_path, body))
    plan = build_plan(spec)
    first, second, third = plan.points
    for point, shift in ((first, 0.0), (second, 0.3)):
        ev = plan.run(point.evaluation)
        scores = [min(1.0, v + shift) for v in [0.0, 1.0, 0.5, 0.0, 0.2] * 20]
        results = results_with_items(ev.run_dir, {"shapesworld_vqa": ("vision", scores, None, 0)})
        add_intervals(results, ev.run_dir, {}, resamples=300, seed=0)
        (ev.run_dir / "results.json").write_text(json.dumps(results))
    table = collect(plan)
    csv_path, md_path = write_tables(table, spec.output_root)
    row = table.rows[0]
    lo, hi = row["vision.shapesworld_vqa_lo"], row["vision.shapesworld_vqa_hi"]
    assert lo < row["vision.shapesworld_vqa"] < hi
    again = read_table(csv_path)
    assert again.metrics == table.metrics and "vision.shapesworld_vqa_lo" not in again.metrics
    assert again.rows[0]["stable_score.vision_hi"] == pytest.approx(row["stable_score.vision_hi"])
    assert again.rows[2]["vision.shapesworld_vqa_lo"] is None  # not evaluated
    assert f"| {row['vision.shapesworld_vqa']:.4f} [{lo:.4f}, {hi:.4f}] |" in markdown(table)
    # every evaluated arm against the first; the third is not evaluated
    tool = sweep_tool()
    assert tool.main([str(spec.path), "--compare", first.name]) == 0
    printed = capsys.readouterr().out
    assert f"(not evaluated yet: {third.name})" in printed
    saved = json.loads((spec.output_root / "comparison.json").read_text())
    (only,) = saved["comparisons"]
    assert only["a"] == first.name and only["b"] == second.name
    vqa = only["rows"][0]
    assert vqa["name"] == "shapesworld_vqa" and vqa["difference"] > 0 and vqa["p_holm"] < 0.01
    assert (spec.output_root / "comparison.md").is_file()
    assert (spec.output_root / "comparison.png").is_file()
    with pytest.raises(ValueError, match="--compare 'nope': not a grid point of sweep t"):
        tool.main([str(spec.path), "--compare", "nope"])
    with pytest.raises(ValueError, match=f"grid point {third.name} has no evaluation yet"):
        tool.main([str(spec.path), "--compare", third.name])


def test_a_failed_run_stops_the_sweep_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]},
                        data={"command": "python -c 'import sys; print(\"broken\"); sys.exit(3)'"})
    path = write_sweep(tmp_path, body)
    assert sweep_tool().main([str(path)]) == 1
    captured = capsys.readouterr()
    log = tmp_path / "out" / "logs" / "data.log"
    assert captured.err.strip().splitlines() == [
        f"sweep: error: run data failed with exit status 3 after "
        f"{re.search(r'after ([0-9.]+) s', captured.err).group(1)} s; log: {log} "
        f"(last line: broken)"]
    assert "[1/" in captured.out and "[2/" not in captured.out


def test_sigterm_stops_the_whole_process_group_even_a_stubborn_grandchild(tmp_path):
    """The running stage starts a grandchild that ignores SIGTERM: the sweep's SIGTERM must
    still leave no process behind (SIGTERM to the group, SIGKILL after the grace period)."""
    ready = tmp_path / "ready"
    stubborn = (f"import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"pathlib.Path({str(ready)!r}).write_text('x'); time.sleep(300)")
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"{stubborn!r}]); time.sleep(300)")
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]},
                        data={"command": f"python -c {shlex.quote(parent)}"})
    path = write_sweep(tmp_path, body)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "sweep.py"), str(path),
                             "--grace", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(ready.is_file, 60, "the grandchild to start", proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) == 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == [
        f"sweep: interrupted by SIGTERM during data: stopped it and every process it started "
        f"(log: {tmp_path / 'out' / 'logs' / 'data.log'}); run the same command again to resume"]
    alive = [p.pid for p in family if psutil.pid_exists(p.pid)
             and psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes outlived the sweep: {alive}"
    assert "[1/" in out and "data: start" in out


def test_a_run_that_exits_0_without_its_result_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]},
                        data={"command": "python -c pass", "creates": str(tmp_path / "ready")})
    assert sweep_tool().main([str(write_sweep(tmp_path, body))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(
        rf"sweep: error: run data exited 0 after [0-9.]+ s but {tmp_path / 'ready'} is missing "
        rf"or incomplete; log: .*data\.log", err[0]), err


def fake_spawn(spawned: list):
    """LocalRunner._spawn that leaves each run's results as a real run would, at once."""

    def spawn(self, run):
        spawned.append(run.id)
        if run.stage == "data":
            run.creates.write_text("ready")
        elif run.stage == "evaluate":
            run.run_dir.mkdir(parents=True, exist_ok=True)
            tasks = {t: {"kind": "vision", "settings": {"limit": run.limit},
                         "metrics": {"accuracy": 0.5}} for t in run.tasks}
            (run.run_dir / "results.json").write_text(json.dumps({
                "checkpoint": {"path": str(run.final_checkpoint)}, "tasks": tasks,
                "stable_score": {"vision": {"score": 0.1}}}))
        else:
            run.final_checkpoint.mkdir(parents=True, exist_ok=True)
            (run.final_checkpoint / "common.json").write_text("{}")
        return 0

    return spawn


def test_a_finished_run_with_other_settings_is_refused_or_rerun_when_asked(
        tmp_path, capsys, monkeypatch):
    """Editing a stage's YAML after its run finished must not skip the run silently: the
    rerun stops naming the run and the setting (and the runs started from it), and
    --rerun-changed moves exactly those aside and runs them again."""
    from megatron_vlm.experiments.execute import LocalRunner
    from megatron_vlm.experiments.stage_records import RECORD_NAME, write_record

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "image_text.yaml"
    config.write_text((TINY / "image_text.yaml").read_text())
    body = recipe_sweep(tmp_path, {"text_checkpoint": [80]},
                        data={"command": "python -c pass", "creates": str(tmp_path / "ready")})
    body["stages"]["image_text"]["config"] = str(config)
    path = write_sweep(tmp_path, body)
    spawned: list = []
    monkeypatch.setattr(LocalRunner, "_spawn", fake_spawn(spawned))
    tool = sweep_tool()
    plan = build_plan(load_sweep(path))
    ids = [run.id for run in plan.runs]
    assert tool.main([str(path)]) == 0 and spawned == ids
    image_text, finetune, evaluate = ids[2:]
    assert (plan.run(image_text).run_dir / RECORD_NAME).is_file()
    spawned.clear()
    assert tool.main([str(path)]) == 0 and spawned == []  # unchanged: everything reused
    original = config.read_text()
    # how often a run saves, and what it keeps, change nothing it produced: still reused
    config.write_text(original.replace("  save_fractions: [1.0]\n", "  save_fractions: [1.0]\n"
                                       "  save_interval: 7\n  keep_last: 3\n"))
    assert tool.main([str(path)]) == 0 and spawned == []
    config.write_text(original)

    config.write_text(config.read_text().replace("min_lr: 1e-5", "min_lr: 2e-5"))
    capsys.readouterr()
    with pytest.raises(ValueError) as err:
        tool.main([str(path)])
    message = str(err.value)
    assert "\n" not in message and spawned == []
    assert f"{image_text} (config.train.min_lr: 1e-05 -> 2e-05)" in message
    assert f"{finetune} (it started from {image_text}, which runs again)" in message
    assert f"{evaluate} (it started from {finetune}, which runs again)" in message
    assert "text (" not in message and "--rerun-changed" in message
    with pytest.raises(ValueError, match="min_lr"):  # the runner itself, as the quickstart uses it
        LocalRunner(build_plan(load_sweep(path))).run()
    assert spawned == []
    assert tool.main([str(path), "--dry-run"]) == 0
    assert "but it ran with other settings (config.train.min_lr" in capsys.readouterr().out

    assert tool.main([str(path), "--rerun-changed"]) == 0
    assert spawned == [image_text, finetune, evaluate]
    assert len(list(plan.run(image_text).run_dir.parent.glob("ckpt80.replaced-*"))) == 1
    spawned.clear()
    assert tool.main([str(path)]) == 0 and spawned == []

    # a run started from a run that completed again since is refused too
    plan = build_plan(load_sweep(path))  # with the edited config
    write_record(plan, plan.run("text"))
    with pytest.raises(ValueError, match=rf"{image_text} \(text ran again since it finished\)"):
        tool.main([str(path)])
    # a finished run without a record (older sweeps, SLURM jobs) is reused with a note
    (plan.run(evaluate).run_dir / RECORD_NAME).unlink()
    write_record(plan, plan.run(image_text))
    write_record(plan, plan.run(finetune))
    capsys.readouterr()
    assert tool.main([str(path)]) == 0 and spawned == []
    assert f"note: 1 finished run(s) have no record of their settings ({evaluate}" in \
        capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# A real sweep on ShapesWorld


def e2e_sweep(tmp_path: Path) -> Path:
    """Projector ablation at tiny size: data -> text (4 steps) -> image_text x2 (2 steps) ->
    finetune x2 (1 epoch of 2 steps) -> evaluation x2 (4 examples per task)."""
    data = tmp_path / "data"
    prepare = (f"python -c \"from megatron_vlm.data.prepare import prepare_shapesworld; "
               f"prepare_shapesworld('{data}', images=48, text_docs=300, quiet=True)\"")
    shards, raw = data / "shards", data / "raw"
    overrides = [f"data.tokenizer={raw}/tokenizer/tokenizer.json",
                 f"data.text={shards}/text/corpus", f"data.captions={shards}/captions",
                 f"data.instructions={shards}/instructions",
                 f"data.instruction_images={shards}/instruction_images",
                 f"evaluation.data_root={raw}", f"evaluation.text_tasks={raw}/text/tasks",
                 f"evaluation.image_embeddings={shards}/eval_images"]
    body = {"name": "e2e", "scale": "tiny_cpu", "output_root": str(tmp_path / "out"),
            "data": {"command": prepare, "creates": str(shards / "eval_images" / "index.json")},
            "overrides": overrides,
            "stages": {
                "text": {"config": str(REPO / "examples/{scale}/text.yaml"),
                         "overrides": ["train.train_iters=4", "checkpoint.save_fractions=[1.0]"]},
                "image_text": {"config": str(REPO / "examples/{scale}/image_text.yaml"),
                               "overrides": ["train.train_iters=2", "data.total_tokens=null"]},
                "finetune": {"config": str(REPO / "examples/{scale}/finetune.yaml"),
                             "steps_per_epoch": 2},
                "evaluate": {"suite": "shapesworld", "limit": 4,
                             "overrides": ["evaluation.batch_size=8",
                                           "evaluation.max_new_tokens=8"]}},
            "grid": {"text_checkpoint": [50], "projector": ["mlp2", "linear"],
                     "finetune_epochs": [1]}}
    return write_sweep(tmp_path, body)


def launch(path: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "sweep.py"), str(path),
                             "--grace", "5"], cwd=REPO, env=env, stdout=open(out, "w"),
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (status {proc.returncode}) before {what}: "
                        f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow  # a whole sweep; the fake-spawn tests above cover the runner
def test_tiny_sweep_killed_midway_resumes_collects_and_reruns_nothing(tmp_path):
    path = e2e_sweep(tmp_path)
    plan = build_plan(load_sweep(path))
    first = plan.by_stage("image_text")[0]
    console = tmp_path / "first.out"
    proc = launch(path, console)
    # SIGTERM while the first image-text run trains (it has loaded the text checkpoint)
    wait_for(lambda: first.log.is_file() and "started from" in first.log.read_text(), 400,
             f"{first.id} to start training", proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the stage should run as a child process"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    # normally the first image-text run; a loaded machine may have let it finish already
    stopped = re.fullmatch(r"sweep: interrupted by SIGTERM during (\S+): stopped it and every "
                           r"process it started \(log: .*\); run the same command again to "
                           r"resume", err.strip().splitlines()[-1])
    assert stopped, err
    ids = [run.id for run in plan.runs]
    killed = ids.index(stopped.group(1))
    assert killed >= ids.index(first.id) and plan.runs[killed].stage != "evaluate"
    survivors = [c.pid for c in children if psutil.pid_exists(c.pid)
                 and psutil.Process(c.pid).status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], f"processes outlived the sweep: {survivors}"
    assert not stage_done(plan.runs[killed])

    # the rerun skips what is done and finishes the rest
    rerun = launch(path, tmp_path / "second.out")
    _, err = rerun.communicate(timeout=600)
    out = (tmp_path / "second.out").read_text()
    assert rerun.returncode == 0, err[-3000:] + out
    for i, run in enumerate(plan.runs):
        outcome = "done in [0-9.]+ s" if i >= killed else r"skipped \("
        assert re.search(rf"\] {re.escape(run.id)}: {outcome}", out), (run.id, out)
    assert "Traceback" not in out and "step " not in out, "run output belongs in the logs"

    # one row per grid point, keyed by its values, with the metrics of its own evaluation
    table = read_table(tmp_path / "out" / "results.csv")
    assert [r["projector"] for r in table.rows] == ["mlp2", "linear"]
    assert {"stable_score.vision", "stable_score.text", "vision.shapesworld_vqa",
            "text.shapesworld_arith"} <= set(table.metrics)
    for row in table.rows:
        assert row["status"] == "ok" and row["text_checkpoint"] == 50
        results = json.loads(Path(row["results"]).read_text())
        assert results["config"]["model"]["projector"]["type"] == row["projector"]
        assert row["stable_score.text"] == results["stable_score"]["text"]["score"]
        assert row["vision.shapesworld_vqa"] == \
            results["tasks"]["shapesworld_vqa"]["metrics"]["accuracy"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| ckpt50_projlinear_ft1 | 50 | linear | 1 | ok |" in markdown

    # a third run finds everything done
    again = launch(path, tmp_path / "third.out")
    _, err = again.communicate(timeout=120)
    out = (tmp_path / "third.out").read_text()
    assert again.returncode == 0, err
    stage_lines = [line for line in out.splitlines() if re.search(r"\[\d+/\d+\]", line)]
    assert len(stage_lines) == len(plan.runs)
    assert all(": skipped (" in line for line in stage_lines), out
