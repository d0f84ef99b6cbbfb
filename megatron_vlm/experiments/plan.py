"""A sweep's grid expanded into stage runs that share what they can, in dependency order.

Every grid point is a chain ``[data] -> [text] -> image_text -> [finetune] -> [evaluate]``.
Each axis first changes one stage (:data:`~megatron_vlm.experiments.sweep_spec.AXES`); a stage
run is named by the values of the axes up to its stage only, so points that agree on those
share it: one text run feeds every text-checkpoint percent (it saves each of their checkpoints),
one image-text run feeds every fine-tuning epoch count. Run directories:
``OUTPUT_ROOT/<stage>/<name>`` (``OUTPUT_ROOT/text`` when no axis reaches the text stage), the
evaluation in ``<last training run>/eval``, logs in ``OUTPUT_ROOT/logs/``.

What the sweep adds to each stage config, in this order (later wins): the sweep's
``overrides``, the stage's ``overrides``, the axes' overrides, then the wiring (``name``,
``output_dir``, ``checkpoint.load``, checkpoints to save, fine-tuning steps):

==================== =========================================================================
axis                 overrides
==================== =========================================================================
text_checkpoint x    image_text: ``checkpoint.load=<text run>/checkpoints/step_N``, N =
                     round(x% of the text run's steps) (the text run saves every such x);
                     x = 0 or 100: ``rewarmup_config`` instead of ``config`` (0: no load)
image_ratio r        image_text: ``data.ratios={text: 1-r, captions: r(1-f), instructions: rf}``
instruction_fraction image_text: f above (without the axis: the config's own split)
encoder unfrozen     image_text, finetune: ``model.encoder.mode=online model.encoder.frozen=false``
projector p          image_text, finetune: ``model.projector.type=p``
finetune_epochs e    finetune: ``train.train_iters=e * steps_per_epoch``; 0: no fine-tuning
scale s              every stage: the config paths' ``{scale}``
==================== =========================================================================

With an ``encoder`` or ``projector`` axis in the grid, every image-text run of the sweep takes
the decoder only from its checkpoint, with a fresh optimizer state
(``checkpoint.load_parts=decoder checkpoint.load_optimizer=false``), so all arms of the
ablation start alike. Every training run saves its final checkpoint (``1.0`` is added to
``checkpoint.save_fractions``): that checkpoint is how a finished run is recognised, and its
stage record (:mod:`megatron_vlm.experiments.stage_records`, from :attr:`StageRun.resolved`)
tells whether it was run with what the sweep gives it now.

Each run's config is loaded and validated here (with every override, the checkpoint it starts
from included: a stage config that continues a schedule needs none of its own; an evaluation's
overrides on the config of the run it evaluates), so a bad key or value stops the sweep before
anything runs. :meth:`Plan.gpu_hours` estimates the training cost: tokens (``train_iters x
global_batch_size x seq_length``) over a throughput in tokens/s/GPU.
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from megatron_vlm.experiments.sweep_spec import AXES, STAGES, SweepSpec, SweepError

ENTRIES = {"text": "pretrain_vlm.py", "image_text": "pretrain_vlm.py",
           "finetune": "finetune_vlm.py", "evaluate": "tools/evaluate_vlm.py"}
EVAL_DIR = "eval"
RESULTS_FILE = "results.json"


@dataclass
class StageRun:
    """One process to run (``torchrun`` or ``python`` of ``entry`` with ``args``)."""

    id: str
    stage: str
    """'data', 'text', 'image_text', 'finetune' or 'evaluate'."""
    name: str
    run_dir: Optional[Path]
    """Training: the output_dir; evaluate: the results directory; data: None."""
    entry: Optional[str]
    """Script relative to the repository root; None for the data command (argv in args)."""
    args: list[str]
    needs: list[str]
    values: dict[str, Any]
    log: Path
    scale: Optional[str] = None
    config: Optional[Path] = None
    train_iters: Optional[int] = None
    tokens: Optional[int] = None
    final_checkpoint: Optional[Path] = None
    """Training: the checkpoint its last step saves (its presence means the run is done);
    evaluate: its target's."""
    target: Optional[str] = None
    """evaluate: the id of the training run it evaluates."""
    tasks: tuple[str, ...] = ()
    """evaluate: every task results.json must hold when the run is done."""
    limit: Optional[int] = None
    creates: Optional[Path] = None
    """data: the path whose existence means the data is prepared."""
    points: list[str] = field(default_factory=list)
    """Names of the grid points this run serves."""
    resolved: Optional[dict[str, Any]] = None
    """Training: its whole config as loaded with every override (what its stage record,
    :mod:`megatron_vlm.experiments.stage_records`, keeps to tell an edited stage)."""
    parses_to: dict[str, Any] = field(default_factory=dict)
    """What the entry point's parser must read from ``args`` where a word out of place would
    change it (argument name -> value: the config and overrides, an evaluation's task list);
    :func:`megatron_vlm.experiments.execute.check_commands` checks it."""

    def command_text(self) -> str:
        argv = ([self.entry] if self.entry else []) + [str(a) for a in self.args]
        return " ".join(shlex.quote(a) for a in argv)


@dataclass
class GridPoint:
    """One combination of the grid's values and the runs it takes."""

    values: dict[str, Any]
    name: str
    chain: list[str]
    evaluation: Optional[str]

    def results_path(self, plan: "Plan") -> Optional[Path]:
        if self.evaluation is None:
            return None
        return plan.run(self.evaluation).run_dir / RESULTS_FILE


@dataclass
class Plan:
    """The runs of a sweep (dependency order) and the grid points they serve."""

    spec: SweepSpec
    points: list[GridPoint]
    runs: list[StageRun]

    def run(self, run_id: str) -> StageRun:
        for run in self.runs:
            if run.id == run_id:
                return run
        raise KeyError(run_id)

    def by_stage(self, stage: str) -> list[StageRun]:
        return [run for run in self.runs if run.stage == stage]

    def gpu_hours(self) -> dict[str, Any]:
        """The training cost estimate: per stage (runs, tokens, GPU-hours), the total, and the
        total if no stage were shared; GPU-hours are None where no throughput is known."""
        per_run: dict[str, Optional[float]] = {}
        sources = {}
        for run in self.runs:
            if run.tokens is None:
                continue
            rate, source = self.spec.throughput_for(run.scale)
            sources[run.scale] = (rate, source)
            per_run[run.id] = None if rate is None else run.tokens / rate / 3600.0
        stages = {}
        for stage in ("text", "image_text", "finetune"):
            runs = [r for r in self.by_stage(stage) if r.id in per_run]
            if runs:
                hours = [per_run[r.id] for r in runs]
                stages[stage] = {"runs": len(runs), "tokens": sum(r.tokens for r in runs),
                                 "gpu_hours": None if None in hours else sum(hours)}
        known = [h for h in per_run.values()]
        total = None if None in known else sum(known)
        unshared = None
        if total is not None:
            unshared = sum(per_run.get(run_id) or 0.0 for point in self.points
                           for run_id in point.chain)
        return {"stages": stages, "total": total, "without_sharing": unshared,
                "throughput": {str(k): {"tokens_per_s_per_gpu": v[0], "source": v[1]}
                               for k, v in sources.items()}}

    def describe(self, status: Optional[Callable[[StageRun], Optional[str]]] = None) -> str:
        """The plan as text (``--dry-run``); ``status`` tells which runs are already done."""
        spec = self.spec
        lines = [f"sweep {spec.name} ({spec.path})"]
        if spec.description:
            lines.append(f"  {spec.description}")
        grid = "; ".join(f"{axis} = {', '.join(map(str, values))}"
                         for axis, values in spec.grid.items())
        lines += [f"grid ({len(self.points)} points): {grid}", f"output root: {spec.output_root}",
                  f"runs ({len(self.runs)}, in dependency order):"]
        for i, run in enumerate(self.runs, 1):
            facts = []
            if run.train_iters is not None:
                facts.append(f"{run.train_iters:,} steps, {run.tokens:.3g} tokens")
            if run.needs:
                facts.append("after " + ", ".join(run.needs))
            if len(run.points) > 1:
                facts.append(f"shared by {len(run.points)} grid points")
            done = status(run) if status else None
            if done:
                facts.append(f"done: {done}")
            lines.append(f"  {i:3d}. {run.id:<44} {'; '.join(facts)}")
            lines.append(f"       {run.command_text()}")
        lines += ["", "shared stages:"]
        for stage in ("text", "image_text", "finetune"):
            runs = self.by_stage(stage)
            if runs:
                uses = sum(len(r.points) for r in runs)
                lines.append(f"  {stage:<11} {len(runs)} run(s) for {uses} grid point(s)")
        lines += ["", "GPU-hours, an ESTIMATE: training tokens / throughput (tokens/s/GPU); "
                      "data preparation and evaluation not counted:"]
        estimate = self.gpu_hours()
        for stage, entry in estimate["stages"].items():
            hours = _hours(entry["gpu_hours"])
            lines.append(f"  {stage:<11} {entry['runs']:3d} run(s)  {entry['tokens']:.3g} "
                         f"tokens  {hours}")
        lines.append(f"  total       {_hours(estimate['total'])} (without shared stages: "
                     f"{_hours(estimate['without_sharing'])})")
        for scale, info in estimate["throughput"].items():
            rate = info["tokens_per_s_per_gpu"]
            where = f" for scale {scale}" if scale != "None" else ""
            lines.append(f"  throughput{where}: "
                         + (f"{rate:,.0f} tokens/s/GPU ({info['source']})" if rate
                            else info["source"]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": self.spec.name, "file": str(self.spec.path),
                "output_root": str(self.spec.output_root),
                "grid": {k: list(v) for k, v in self.spec.grid.items()},
                "points": [{"name": p.name, "values": p.values, "chain": p.chain}
                           for p in self.points],
                "runs": [{"id": r.id, "stage": r.stage, "needs": r.needs,
                          "run_dir": str(r.run_dir) if r.run_dir else None,
                          "command": r.command_text(), "train_iters": r.train_iters,
                          "tokens": r.tokens, "points": r.points, "log": str(r.log)}
                         for r in self.runs],
                "gpu_hours": self.gpu_hours()}


def _hours(value: Optional[float]) -> str:
    if value is None:
        return "n/a GPU-h"
    return f"{value:,.1f} GPU-h" if value >= 10 else f"{value:.3g} GPU-h"


# ---------------------------------------------------------------------------------------------
# Building the plan


def parse_only(items: Iterable[str], spec: SweepSpec) -> dict[str, set]:
    """``AXIS=V1,V2`` filters (tools/sweep.py --only) as {axis: values}; ValueError when the
    axis is not in the grid or a value is not one of its values."""
    only: dict[str, set] = {}
    for item in items:
        axis, sep, text = item.partition("=")
        if not sep or axis not in spec.grid:
            raise ValueError(f"--only {item!r}: give AXIS=VALUE[,VALUE...] with an axis of the "
                             f"grid ({', '.join(spec.grid)})")
        wanted = set()
        for word in text.split(","):
            match = [v for v in spec.grid[axis] if str(v) == word.strip()
                     or AXES[axis].tag(v) == word.strip()]
            if not match:
                raise ValueError(f"--only {item!r}: {word!r} is not a value of grid.{axis} "
                                 f"({', '.join(map(str, spec.grid[axis]))})")
            wanted.update(match)
        only[axis] = wanted
    return only


def run_name(values: dict[str, Any], upto: str) -> str:
    """The name of a stage run: the tags of the axes that reach ``upto``'s stage, in canonical
    axis order (deterministic from the grid values)."""
    last = STAGES.index(upto)
    return "_".join(AXES[a].tag(values[a]) for a in AXES
                    if a in values and STAGES.index(AXES[a].stage) <= last)


def build_plan(spec: SweepSpec, only: Optional[dict[str, set]] = None) -> Plan:
    """Expands the grid (optionally only the points matching ``only``) into stage runs."""
    return _Builder(spec).build(only or {})


class _Builder:
    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.runs: dict[str, StageRun] = {}
        self.logs = spec.output_root / "logs"

    def build(self, only: dict[str, set]) -> Plan:
        spec = self.spec
        axes = list(spec.grid)
        points = []
        for combo in itertools.product(*spec.grid.values()):
            values = dict(zip(axes, combo))
            if any(values[a] not in allowed for a, allowed in only.items()):
                continue
            name = run_name(values, "evaluate")
            chain = self._chain(values)
            for run_id in chain:
                self.runs[run_id].points.append(name)
            evaluation = chain[-1] if self.runs[chain[-1]].stage == "evaluate" else None
            points.append(GridPoint(values, name, chain, evaluation))
        return Plan(spec, points, list(self.runs.values()))

    def _chain(self, values: dict[str, Any]) -> list[str]:
        spec = self.spec
        chain = []
        if spec.data is not None:
            chain.append(self._data().id)
        scale = values.get("scale", spec.scale)
        text = None
        if "text" in spec.stages and values.get("text_checkpoint", 0) > 0:
            text = self._text(values, scale)
            chain.append(text.id)
        last = self._image_text(values, scale, text)
        chain.append(last.id)
        if "finetune" in spec.stages and values.get("finetune_epochs", 1) > 0:
            last = self._finetune(values, scale, last)
            chain.append(last.id)
        if spec.evaluate is not None:
            chain.append(self._evaluate(last).id)
        return chain

    # -- the stages ---------------------------------------------------------------------------

    def _data(self) -> StageRun:
        if "data" not in self.runs:
            data = self.spec.data
            self.runs["data"] = StageRun(
                id="data", stage="data", name="", run_dir=None, entry=None,
                args=shlex.split(data.command), needs=[], values={}, log=self.logs / "data.log",
                creates=Path(data.creates) if data.creates else None)
        return self.runs["data"]

    def _needs_data(self) -> list[str]:
        return ["data"] if self.spec.data is not None else []

    def _text(self, values: dict, scale: Optional[str]) -> StageRun:
        name = run_name(values, "text")
        run_id = _run_id("text", name)
        if run_id in self.runs:
            return self.runs[run_id]
        spec, stage = self.spec, self.spec.stages["text"]
        path = spec.config_path(stage.config, scale)
        base = [*spec.overrides, *stage.overrides]
        cfg = self._load(path, base, run_id)
        # Every checkpoint any grid point starts from, even those --only leaves out: the text
        # run is shared, and a finished run saves nothing more.
        wanted = {c / 100 for c in spec.grid.get("text_checkpoint", ()) if c > 0}
        fractions = sorted({*map(float, cfg.checkpoint.save_fractions), *wanted, 1.0})
        run_dir = self._dir("text", name)
        wiring = [f"name={spec.name}-text" + (f"-{name}" if name else ""),
                  f"output_dir={run_dir}", f"checkpoint.save_fractions={fractions}"]
        return self._training("text", name, values, scale, path, [*base, *wiring],
                              self._needs_data())

    def _image_text(self, values: dict, scale: Optional[str], text: Optional[StageRun]) -> StageRun:
        name = run_name(values, "image_text")
        run_id = _run_id("image_text", name)
        if run_id in self.runs:
            return self.runs[run_id]
        spec, stage = self.spec, self.spec.stages["image_text"]
        percent = values.get("text_checkpoint")
        template = stage.rewarmup_config if percent in (0, 100) else stage.config
        path = spec.config_path(template, scale)
        base = [*spec.overrides, *stage.overrides]
        wiring = []
        if text is not None:
            wiring.append(f"checkpoint.load={_text_checkpoint(text, percent)}")
        elif percent == 0:
            wiring.append("checkpoint.load=null")
        # Loaded with its checkpoint: a config that continues (schedule.mode=continue) is
        # refused without one, and the sweep is what sets it.
        cfg = self._load(path, [*base, *wiring], run_id)
        axis = _data_ratio_overrides(values, cfg.data.ratios)
        axis += _model_overrides(values, spec.online_data)
        if cfg.checkpoint.load is not None and ("projector" in spec.grid
                                                or "encoder" in spec.grid):
            axis += ["checkpoint.load_parts=decoder", "checkpoint.load_optimizer=false"]
        run_dir = self._dir("image_text", name)
        wiring += [f"name={spec.name}-image_text" + (f"-{name}" if name else ""),
                   f"output_dir={run_dir}", _final_save(cfg)]
        needs = [text.id] if text is not None else self._needs_data()
        return self._training("image_text", name, values, scale, path, [*base, *axis, *wiring],
                              needs)

    def _finetune(self, values: dict, scale: Optional[str], parent: StageRun) -> StageRun:
        name = run_name(values, "finetune")
        run_id = _run_id("finetune", name)
        if run_id in self.runs:
            return self.runs[run_id]
        spec, stage = self.spec, self.spec.stages["finetune"]
        path = spec.config_path(stage.config, scale)
        base = [*spec.overrides, *stage.overrides]
        load = f"checkpoint.load={parent.run_dir / 'checkpoints'}"
        cfg = self._load(path, [*base, load], run_id)  # with its checkpoint, as image_text
        axis = _model_overrides(values, spec.online_data)
        if "finetune_epochs" in values:
            per_epoch = stage.steps_per_epoch or cfg.train.train_iters
            axis.append(f"train.train_iters={values['finetune_epochs'] * per_epoch}")
        run_dir = self._dir("finetune", name)
        wiring = [f"name={spec.name}-finetune" + (f"-{name}" if name else ""),
                  f"output_dir={run_dir}", load, _final_save(cfg)]
        return self._training("finetune", name, values, scale, path, [*base, *axis, *wiring],
                              [parent.id])

    def _evaluate(self, target: StageRun) -> StageRun:
        from megatron_vlm.config import config_from_dict
        from megatron_vlm.evaluation.runner import select_tasks

        run_id = f"evaluate/{target.id}"
        if run_id in self.runs:
            return self.runs[run_id]
        ev = self.spec.evaluate
        out = target.run_dir / EVAL_DIR
        args = ["--checkpoint", str(target.run_dir), "--suite", ev.suite, "--output", str(out),
                "--no-progress"]
        if ev.tasks:
            args += ["--tasks", *ev.tasks]
        if ev.limit is not None:
            args += ["--limit", str(ev.limit)]
        args += [*ev.args, *ev.overrides]
        vision, text = select_tasks(ev.suite, ev.tasks)
        # tools/evaluate_vlm.py applies the overrides to the checkpoint's config, which is the
        # target's resolved config: a bad key stops the sweep now, not after the training.
        try:
            config_from_dict(target.resolved, f"the config of {target.id}", ev.overrides)
        except ValueError as err:
            raise SweepError(f"{self.spec.path}: run {run_id}: stages.evaluate.overrides: "
                             f"{err}") from None
        run = StageRun(id=run_id, stage="evaluate", name=target.name, run_dir=out,
                       entry=ENTRIES["evaluate"], args=args, needs=[target.id],
                       values=dict(target.values), log=self._log(run_id), scale=target.scale,
                       target=target.id, tasks=(*vision, *text), limit=ev.limit,
                       final_checkpoint=target.final_checkpoint,
                       parses_to={"tasks": list(ev.tasks) if ev.tasks else None})
        self.runs[run_id] = run
        return run

    # -- helpers ------------------------------------------------------------------------------

    def _training(self, stage: str, name: str, values: dict, scale: Optional[str], path: Path,
                  overrides: list[str], needs: list[str]) -> StageRun:
        from megatron_vlm.config import config_to_dict

        run_id = _run_id(stage, name)
        cfg = self._load(path, overrides, run_id)
        train = cfg.train
        run_dir = Path(cfg.output_dir)
        last = run_dir / "checkpoints" / f"step_{train.train_iters:07d}"
        reach = STAGES.index(stage)
        config = _display_path(path)
        run = StageRun(
            id=run_id, stage=stage, name=name, run_dir=run_dir, entry=ENTRIES[stage],
            args=[config, *overrides], needs=needs,
            values={a: v for a, v in values.items() if STAGES.index(AXES[a].stage) <= reach},
            log=self._log(run_id), scale=scale, config=path, train_iters=train.train_iters,
            tokens=train.train_iters * train.global_batch_size * train.seq_length,
            final_checkpoint=last, resolved=config_to_dict(cfg),
            parses_to={"config": config, "overrides": list(overrides)})
        self.runs[run_id] = run
        return run

    def _load(self, path: Path, overrides: list[str], run_id: str):
        from megatron_vlm.config import load_config

        try:
            return load_config(str(path), overrides)
        except ValueError as err:
            raise SweepError(f"{self.spec.path}: run {run_id}: config {_display_path(path)} with "
                             f"the sweep's overrides: {err}") from None

    def _dir(self, stage: str, name: str) -> Path:
        return self.spec.output_root / stage / name if name else self.spec.output_root / stage

    def _log(self, run_id: str) -> Path:
        return self.logs / (run_id.replace("/", "-") + ".log")


def _run_id(stage: str, name: str) -> str:
    return f"{stage}/{name}" if name else stage


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (shorter commands)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _text_checkpoint(text: StageRun, percent: float) -> Path:
    """The text run's checkpoint directory at ``percent`` of its schedule (the step its
    training loop saves for that fraction)."""
    from megatron_vlm.training.schedule import checkpoint_steps

    (step,) = checkpoint_steps(text.train_iters, [percent / 100])
    return text.run_dir / "checkpoints" / f"step_{step:07d}"


def _final_save(cfg) -> str:
    fractions = sorted({*map(float, cfg.checkpoint.save_fractions), 1.0})
    return f"checkpoint.save_fractions={fractions}"


def _share(value: float) -> float:
    return round(value, 12)


def _data_ratio_overrides(values: dict, ratios: dict) -> list[str]:
    """``data.ratios`` for the image_ratio / instruction_fraction axes (none without them)."""
    if "image_ratio" not in values and "instruction_fraction" not in values:
        return []
    captions, instructions = ratios.get("captions", 0.0), ratios.get("instructions", 0.0)
    image = values.get("image_ratio", captions + instructions)
    if "instruction_fraction" in values:
        fraction = values["instruction_fraction"]
    else:
        fraction = instructions / (captions + instructions) if captions + instructions else 0.0
    shares = {"text": _share(1.0 - image), "captions": _share(image * (1.0 - fraction)),
              "instructions": _share(image * fraction)}
    body = ", ".join(f"{k}: {v!r}" for k, v in shares.items() if v > 0)
    return [f"data.ratios={{{body}}}"]


def _model_overrides(values: dict, online_data: Sequence[str] = ()) -> list[str]:
    """The projector / encoder axes; the unfrozen arm also reads its images from the sweep's
    ``online_data`` (image shards: an online encoder does not take precomputed embeddings)."""
    out = []
    if "projector" in values:
        out.append(f"model.projector.type={values['projector']}")
    if values.get("encoder") == "unfrozen":
        out += ["model.encoder.mode=online", "model.encoder.frozen=false", *online_data]
    return out
