"""The paper in miniature: the quickstart's pipeline (``python -m megatron_vlm.quickstart``).

One grid point of the sweep file ``examples/quickstart/paper_in_miniature.yaml``, run through
the sweep runner (:mod:`megatron_vlm.experiments.execute`: one console line per stage, each
stage a subprocess of the real entry point with its whole output in ``logs/``, skipped when its
results exist, resumed when interrupted):

    data -> text (80% checkpoint) -> image_text (continues the schedule, 15% captions)
    -> finetune -> evaluate (ShapesWorld VQA, POPE, referring boxes, text tasks)

then one more evaluation of the same checkpoint with every image replaced by one blank image
(``evaluation.blank_images=true``, the vision tasks only): the drop of the vision stable score
from the first to the second is how much the model's answers come from the images, tested as a
paired difference over the same items (:func:`images_test`: its 95% interval and p-value). It
ends with a table of both (also ``OUTPUT_ROOT/results.md``), a figure of the per-task accuracies
(``OUTPUT_ROOT/plots/tasks.png``) and what to run next.

Everything goes under ``OUTPUT_ROOT`` of the working directory (``runs/quickstart``, or
``runs/quickstart_short`` for :data:`SHORT`, the shorter version CI runs; with key=value
overrides a ``-<hash of the overrides>`` suffix, so that a run with other settings never finds
another's stages done); the data under ``runs/quickstart/data`` is shared by all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import yaml

from megatron_vlm.experiments.plan import RESULTS_FILE, Plan, StageRun, build_plan
from megatron_vlm.experiments.sweep_spec import parse_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP_FILE = REPO / "examples" / "quickstart" / "paper_in_miniature.yaml"
BLANK_DIR = "eval_blank"

SHORT = {"output_root": "runs/quickstart_short", "text": 150, "image_text": 300,
         "finetune_epochs": 6}
"""The shorter version (``--short``, CI): fewer steps per stage, the same data. Six fine-tuning
epochs: at four, whether the model has begun to use the images depends on the machine's float
rounding (VQA gained +0.123 from the images on one 2-core machine, +0.011 on another)."""


@dataclasses.dataclass
class Scores:
    """What one evaluation's results.json says (None where a task is missing)."""

    tasks: dict[str, Optional[float]]
    """Each task's headline accuracy."""
    kinds: dict[str, str]
    """Each task's kind: 'vision' or 'text'."""
    vision: Optional[float]
    text: Optional[float]

    @classmethod
    def read(cls, path: Path) -> "Scores":
        results = json.loads(path.read_text())
        tasks, kinds = {}, {}
        for task, entry in (results.get("tasks") or {}).items():
            metrics = entry.get("metrics") or {}
            value = metrics.get("accuracy", metrics.get("acc"))
            tasks[task] = float(value) if isinstance(value, (int, float)) else None
            kinds[task] = entry.get("kind", "vision")
        stable = results.get("stable_score") or {}
        return cls(tasks, kinds, (stable.get("vision") or {}).get("score"),
                   (stable.get("text") or {}).get("score"))


def miniature_plan(short: bool = False, overrides: Sequence[str] = ()) -> Plan:
    """The quickstart's runs: the sweep file's (``overrides`` added to every training stage;
    :data:`SHORT`'s step counts with ``short``), then the blank-image evaluation."""
    raw = yaml.safe_load(SWEEP_FILE.read_text())
    raw["overrides"] = [*(raw.get("overrides") or []), *overrides]
    root = SHORT["output_root"] if short else raw["output_root"]
    if overrides:  # other settings, other runs: never skip a stage another setting finished
        root += "-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    raw["output_root"] = root
    if short:
        for stage in ("text", "image_text"):
            stage_raw = raw["stages"][stage]
            stage_raw["overrides"] = [*(stage_raw.get("overrides") or []),
                                      f"train.train_iters={SHORT[stage]}"]
        raw["grid"]["finetune_epochs"] = [SHORT["finetune_epochs"]]
    plan = build_plan(parse_sweep(raw, SWEEP_FILE))
    (point,) = plan.points
    evaluation = plan.run(point.evaluation)
    plan.runs.append(blank_evaluation(evaluation))
    return plan


def blank_evaluation(evaluation: StageRun) -> StageRun:
    """``evaluation`` of the vision tasks again, every image replaced by a blank one."""
    from megatron_vlm.evaluation.runner import select_tasks

    out = evaluation.run_dir.parent / BLANK_DIR
    args = list(evaluation.args)
    args[args.index("--output") + 1] = str(out)
    args[args.index("--suite") + 1] = "shapesworld_vision"
    vision, _ = select_tasks("shapesworld_vision", None)
    return dataclasses.replace(evaluation, id=f"evaluate_blank/{evaluation.target}",
                               run_dir=out, args=[*args, "evaluation.blank_images=true"],
                               needs=[evaluation.id], tasks=tuple(vision),
                               log=evaluation.log.with_name(
                                   evaluation.log.name.replace("evaluate", "evaluate_blank", 1)))


def results_markdown(with_images: Scores, blank: Scores, checkpoint: str) -> str:
    """The quickstart's table: every task and stable score, with images and blank."""
    def cell(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"Checkpoint: {checkpoint}", "",
             "| task | with images | blank images |", "|---|---|---|"]
    for task, value in with_images.tasks.items():
        lines.append(f"| {task} | {cell(value)} | {cell(blank.tasks.get(task))} |")
    lines.append(f"| **vision stable score** | {cell(with_images.vision)} | {cell(blank.vision)} |")
    lines.append(f"| **text stable score** | {cell(with_images.text)} | - |")
    return "\n".join(lines) + "\n"


def vision_drop(with_images: Scores, blank: Scores) -> Optional[float]:
    """How much the vision stable score falls when every image is blank."""
    if with_images.vision is None or blank.vision is None:
        return None
    return with_images.vision - blank.vision


def images_test(with_images_dir: Path, blank_dir: Path):
    """(the vision stable score with images against blank images, paired over the items both
    evaluations scored: a :class:`~megatron_vlm.evaluation.compare.Row`, or None; why not, or
    ''). The blank evaluation asks the same questions, so every item pairs."""
    from megatron_vlm.evaluation.compare import STABLE_PREFIX, compare, load_arm

    try:
        comparison = compare(load_arm(blank_dir, "blank images"),
                             load_arm(with_images_dir, "with images"))
    except (FileNotFoundError, ValueError) as err:  # e.g. results from before items were kept
        return None, str(err)
    rows = {row.name: row for row in comparison.rows}
    return rows.get(STABLE_PREFIX + "vision"), ""


def images_test_text(row) -> str:
    """The paired test of :func:`images_test` in words."""
    return (f"95% CI [{row.ci95[0]:+.3f}, {row.ci95[1]:+.3f}], p = {row.p_value:.2g}, "
            f"paired bootstrap over the same {row.n} items")


def write_figure(with_images: Scores, blank: Scores, out_dir: Path, title: str) -> Path:
    """``out_dir/tasks.png``: per-task accuracy with images and with blank images, as grouped
    bars (vision and text tasks in two panels, drawn as tools/plot_results.py draws them)."""
    import matplotlib.pyplot as plt

    from megatron_vlm.experiments.plots import FigureData, Panel, Series, render

    panels = []
    vision_tasks = [t for t, kind in with_images.kinds.items() if kind == "vision"]
    text_tasks = [t for t, kind in with_images.kinds.items() if kind == "text"]
    series = [Series("with images", vision_tasks, [with_images.tasks[t] or 0.0
                                                   for t in vision_tasks]),
              Series("blank images", vision_tasks, [blank.tasks.get(t) or 0.0
                                                    for t in vision_tasks])]
    panels.append(Panel("vision tasks", "task", "accuracy", series, categories=vision_tasks))
    if text_tasks:
        panels.append(Panel("text tasks", "task", "accuracy",
                            [Series("with images", text_tasks,
                                    [with_images.tasks[t] or 0.0 for t in text_tasks])],
                            categories=text_tasks))
    note = (f"vision stable score {with_images.vision:.3f} with images, {blank.vision:.3f} "
            "blank" if with_images.vision is not None and blank.vision is not None else "")
    fig = render(FigureData("tasks", "accuracy per task", panels, note), title)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tasks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(plan: Plan) -> tuple[str, Optional[float]]:
    """(the text the quickstart ends with, the vision stable score's drop); writes
    results.md and the figure under the sweep's output root."""
    (point,) = plan.points
    evaluation = plan.run(point.evaluation)
    blank_run = plan.runs[-1]
    with_images = Scores.read(evaluation.run_dir / RESULTS_FILE)
    blank = Scores.read(blank_run.run_dir / RESULTS_FILE)
    root = plan.spec.output_root
    table = results_markdown(with_images, blank, str(evaluation.final_checkpoint))
    test, why_not = images_test(evaluation.run_dir, blank_run.run_dir)
    tested = "" if test is None else (
        f"\nWith images against blank images, vision stable score {test.difference:+.3f} "
        f"({images_test_text(test)}).\n")
    (root / "results.md").write_text(f"# {plan.spec.name}\n\n{table}{tested}")
    figure = write_figure(with_images, blank, root / "plots", plan.spec.name)
    drop = vision_drop(with_images, blank)
    examples = ("every example" if evaluation.limit is None
                else f"the first {evaluation.limit} examples per task split")
    grid = ", ".join(f"{axis} {value}" for axis, value in point.values.items())
    lines = ["", f"the paper in miniature ({grid}): evaluation of the fine-tuned model on "
                 f"{examples}", "", table]
    if drop is not None:
        lines.append(f"vision stable score with images {with_images.vision:.3f}, with blank "
                     f"images {blank.vision:.3f}: the images are worth {drop:+.3f}" +
                     (f" ({images_test_text(test)})" if test is not None
                      else f" (no paired test: {why_not})" if why_not else ""))
    lines += [f"table: {root / 'results.md'}; figure: {figure}; logs: {root / 'logs'}", "",
              "what next:",
              "  python tools/sweep.py examples/sweeps/fig4_checkpoint_pct_tiny_cpu.yaml   "
              "# a paper figure at CPU size (docs/experiments.md)",
              "  python tools/sweep.py examples/sweeps/seed_ablations_1b.yaml --dry-run   "
              "# the 1B seed ablations: plan and GPU-hours",
              "  examples/1b/, docker/, docs/gpu.md                                      "
              "# the GPU recipes (79m, 1b, 7b)"]
    return "\n".join(lines), drop
